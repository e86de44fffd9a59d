"""Write a trace file for a training pool from an OpenAI-compatible chat endpoint.

The pool is built exactly as a run builds it, from ``conf=NAME`` and ``key=value`` overrides (the
same arguments ``python -m stagewise_pl.fit`` takes); the file is what the ``trace_file`` teacher
reads: one JSON row per problem, ``{"id": ..., "traces": [...]}``.

    python tools/make_traces.py --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-72B-Instruct \\
        --out traces.jsonl --n 4 data.source=jsonl data.path=pool.jsonl

With ``--verify`` (the default) only traces whose final answer the configured verifier accepts
against the problem's gold answer are kept; a problem with none kept gets no row and is listed at the
end. The run resumes: problems already in ``--out`` are skipped, rows are appended and flushed one by
one, and every answer is cached in ``--cache-dir``, so a restart pays for nothing twice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stagewise_pl.config import CONF_DIR, ConfigError
from stagewise_pl.teachers.base import TeacherError

DEFAULT_PROMPTS_FILE = CONF_DIR / "prompts" / "default.yaml"
SHOWN_MISSING = 20  # problems without a row named in the summary


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/make_traces.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Trailing arguments: conf=NAME and group.key=value overrides, as python -m stagewise_pl.fit takes "
               "them\n(e.g. data.source=jsonl data.path=pool.jsonl data.limit=100).")
    parser.add_argument("--base-url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model name the endpoint serves")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="NAME of the environment variable holding the API key (unset = no key sent)")
    parser.add_argument("--out", required=True, type=Path, help="the trace file (JSONL), appended to")
    parser.add_argument("--n", type=int, default=1, help="traces asked for per problem (default 1)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default 8)")
    parser.add_argument("--cache-dir", type=Path, help="answer cache (default: <out>.cache next to --out)")
    parser.add_argument("--prompts", type=Path,
                        help=f"YAML file of templates (teacher_trace, ...); missing ones come from "
                             f"{DEFAULT_PROMPTS_FILE}")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="keep only traces the configured verifier accepts against the gold answer")
    parser.add_argument("--limit", type=int, default=0, help="only the first N problems of the pool (0 = all)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest trace in tokens (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed sent with each request (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="conf=NAME and config overrides")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.limit < 0:
        parser.error("--n and --concurrency must be >= 1, --limit >= 0")
    return args


def load_prompts(path: Path | None) -> dict | None:
    """The templates of ``path`` (top-level ``teacher_*`` keys); None = the project's conf/prompts/default.yaml."""
    import yaml

    if path is None:
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--prompts {path}: cannot read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not any(str(k).startswith("teacher_") for k in data):
        raise ConfigError(f"--prompts {path}: needs top-level teacher_* templates (teacher_trace, ...)")
    return data


def load_pool(overrides: list[str]):
    """The training pool of the configuration, built by the function a run uses."""
    from stagewise_pl.cli import parse_args
    from stagewise_pl.config import load_config
    from stagewise_pl.data.loaders import load_pool as load_data
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    given = parse_args(overrides)
    cfg = load_config(given.conf, given.overrides)
    pool, _ = load_data(cfg.data, ArithmeticTask.from_config(cfg.task))
    return cfg, pool


def done_ids(out: Path) -> set[str]:
    """Ids that already have a row. A last line without its newline is a row torn by a crash mid-write
    (cut off, so that problem is asked again) or a hand-written file's last row (given its newline)."""
    from stagewise_pl.teachers.trace_file import TraceFileTeacher

    if not out.is_file() or out.stat().st_size == 0:
        return set()
    text = out.read_bytes()
    if not text.endswith(b"\n"):
        cut = text.rfind(b"\n") + 1
        try:
            json.loads(text[cut:])
            with open(out, "ab") as handle:
                handle.write(b"\n")
        except ValueError:
            with open(out, "r+b") as handle:
                handle.truncate(cut)
            print(f"{out}: cut off a torn last line (a crash mid-write); that problem is asked again",
                  file=sys.stderr)
    return set(TraceFileTeacher(out).by_id)


def keep_verified(chunk, traces: list[list[str]], verifier) -> list[list[str]]:
    """Per problem, the non-empty traces (that the verifier accepts, when there is one)."""
    traces = [[t for t in ts if t.strip()] for ts in traces]
    if verifier is None:
        return traces
    flat = [(t, p.answer) for p, ts in zip(chunk, traces) for t in ts]
    verdicts = iter(verifier.score_batch([t for t, _ in flat], [g for _, g in flat]))
    return [[t for t in ts if next(verdicts).reason == "correct"] for ts in traces]


def generate(args: argparse.Namespace, teacher, todo: list, verifier) -> tuple[int, int, int, list[str]]:
    """Ask, check and append rows chunk by chunk: rows written, traces kept, dropped, ids with no row."""
    from tqdm.auto import tqdm

    written = kept = dropped = 0
    missing: list[str] = []
    size = 4 * args.concurrency  # enough to keep every slot busy; a crash loses at most this (and the cache has it)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as handle, tqdm(total=len(todo), desc="traces", unit="problem") as bar:
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            asked = teacher.traces(chunk, n=args.n)
            good = keep_verified(chunk, asked, verifier)
            for problem, answers, ok in zip(chunk, asked, good):
                kept, dropped = kept + len(ok), dropped + len(answers) - len(ok)
                if not ok:
                    missing.append(problem.id)
                    continue
                handle.write(json.dumps({"id": problem.id, "traces": ok}, ensure_ascii=False) + "\n")
                handle.flush()
                written += 1
            bar.update(len(chunk))
    return written, kept, dropped, missing


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from stagewise_pl.teachers.http import OpenAITeacher

    try:
        prompts = load_prompts(args.prompts)
        cfg, pool = load_pool(args.overrides)
        teacher = OpenAITeacher(args.base_url, args.model, api_key_env=args.api_key_env, prompts=prompts,
                                temperature=args.temperature, max_tokens=args.max_tokens, concurrency=args.concurrency,
                                cache_dir=args.cache_dir or Path(f"{args.out}.cache"), seed=args.seed)
        pool = pool[:args.limit] if args.limit else pool
        done = done_ids(args.out)
    except (TeacherError, OSError, ValueError) as exc:  # ConfigError and BadRowError are ValueErrors
        print(f"error: {' '.join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__}",
              file=sys.stderr)
        return 2
    todo = [p for p in pool if p.id not in done]
    verifier = None
    if args.verify and todo:
        from stagewise_pl.verify import make_verifier

        verifier = make_verifier(cfg.verifier)
    try:
        written, kept, dropped, missing = generate(args, teacher, todo, verifier)
    except TeacherError as exc:
        print(f"error: {exc} (rows written so far are kept; rerun to resume)", file=sys.stderr)
        return 1
    finally:
        if verifier is not None:
            verifier.close()
    s = teacher.stats
    print(f"make_traces: {len(pool)} problems ({len(pool) - len(todo)} already in {args.out}), {written} rows written, "
          f"traces kept {kept} / dropped {dropped}, requests {s['requests']}, cache hits {s['cache_hits']}, "
          f"failed {s['failed']}")
    if missing:
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        print(f"no row for {len(missing)} problems (no trace kept): {', '.join(missing[:SHOWN_MISSING])}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
