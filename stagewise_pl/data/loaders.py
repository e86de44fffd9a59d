"""Problem pools from the built-in task, JSONL files, local Hugging Face datasets and benchmark files.

Every source is mapped onto :class:`~stagewise_pl.data.problems.Problem`. A row that cannot be
mapped (invalid JSON or UTF-8, no problem text, no gold answer, a duplicate id, ...) raises
:class:`BadRowError` naming the file and line, or -- with ``on_bad_row="skip"`` -- is skipped and
counted per reason; more bad rows than ``max_bad_fraction`` of the file aborts the load.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from stagewise_pl.data.problems import BadRowError, Problem
from stagewise_pl.verify.exact import last_boxed


@dataclass
class LoadReport:
    """What a load kept and skipped: counts per reason and the first few places of each."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    total: int = 0  # rows read
    where: dict[str, str] = field(default_factory=dict)  # problem id -> file:line
    filter: str = ""  # data.filter / eval.filter applied after the rows were read
    filtered: dict[str, int] = field(default_factory=dict)  # what it dropped: dropped, no_<measure>

    def skip(self, err: BadRowError) -> None:
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, [])
        if len(self.examples[err.reason]) < 5:
            self.examples[err.reason].append(err.where)

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {n}" for k, n in self.filtered.items() if n)
        filtered = f" (filter {self.filter}: kept {self.kept}, {dropped})" if self.filter else ""
        if not self.skipped:
            return f"{self.source}: {self.kept} problems{filtered}"
        parts = ", ".join(f"{reason} {n} (e.g. {', '.join(self.examples[reason][:2])})"
                          for reason, n in sorted(self.skipped.items()))
        return f"{self.source}: {self.kept} problems{filtered}, skipped {sum(self.skipped.values())}: {parts}"


RowMapper = Callable[[dict, str, int], Problem]


def _text(row: dict, key: str, where: str, reason: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRowError(where, reason, f"field {key!r} is missing or null")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = _number_text(value)
    if not isinstance(value, str):
        raise BadRowError(where, "bad_type", f"field {key!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise BadRowError(where, reason, f"field {key!r} is empty")
    return value


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def field_mapper(fields: dict[str, str], source: str) -> RowMapper:
    """Map a row by a field map {id, prompt, answer, solution, level} -> row keys."""
    def mapper(row: dict, stem: str, line: int) -> Problem:
        where = f"{source}:{line}"
        prompt = _text(row, fields.get("prompt", "prompt"), where, "no_prompt")
        answer = _text(row, fields.get("answer", "answer"), where, "no_answer")
        pid = row.get(fields.get("id", "id")) if fields.get("id", "id") in row else None
        solution = row.get(fields["solution"]) if "solution" in fields else None
        level = row.get(fields["level"]) if "level" in fields else None
        return Problem(id=str(pid) if pid is not None else f"{stem}-{line}", prompt=prompt, answer=answer,
                       source=stem, solution=solution if isinstance(solution, str) else None,
                       level=None if level is None else str(level))
    return mapper


def strip_calculator(text: str) -> str:
    """GSM8K solutions carry calculator annotations <<48/2=24>>: drop them."""
    return re.sub(r"<<[^>]*>>", "", text)


def _gsm8k(row: dict, stem: str, line: int) -> Problem:
    where = f"{stem}.jsonl:{line}"
    question = _text(row, "question", where, "no_prompt")
    full = _text(row, "answer", where, "no_answer")
    if "####" not in full:
        raise BadRowError(where, "no_answer", "no '#### answer' in field 'answer'")
    solution, gold = full.rsplit("####", 1)
    gold = gold.strip().replace(",", "")
    if not gold:
        raise BadRowError(where, "no_answer", "empty answer after '####'")
    steps = len(re.findall(r"<<[^>]*>>", solution))  # the calculator's operations: how many steps it takes
    return Problem(id=f"{stem}-{line}", prompt=question, answer=gold, source=stem,
                   solution=strip_calculator(solution).strip() + f"\n#### {gold}", level=str(steps),
                   meta={"calculator_steps": steps})


def _with_solution(prompt_key: str) -> RowMapper:
    def mapper(row: dict, stem: str, line: int) -> Problem:
        where = f"{stem}.jsonl:{line}"
        solution = row.get("solution") if isinstance(row.get("solution"), str) else None
        level = row.get("level")
        return Problem(id=str(row.get("unique_id") or row.get("id") or f"{stem}-{line}"),
                       prompt=_text(row, prompt_key, where, "no_prompt"),
                       answer=_text(row, "answer", where, "no_answer"),
                       source=stem, solution=solution, level=None if level is None else str(level))
    return mapper


def _minerva(row: dict, stem: str, line: int) -> Problem:
    where = f"{stem}.jsonl:{line}"
    solution = _text(row, "solution", where, "no_answer")
    gold = last_boxed(solution)
    if gold is None or not gold.strip():
        raise BadRowError(where, "no_answer", "no \\boxed{} answer in field 'solution'")
    return Problem(id=f"{stem}-{line}", prompt=_text(row, "problem", where, "no_prompt"), answer=gold.strip(),
                   source=stem, solution=solution)


def _olympiad(row: dict, stem: str, line: int) -> Problem:
    where = f"{stem}.jsonl:{line}"
    final = row.get("final_answer")
    if isinstance(final, list):
        final = [str(a).strip() for a in final if a is not None and str(a).strip()]
        gold = ", ".join(final)
    else:
        gold = final.strip() if isinstance(final, str) else ""
    if not gold:
        raise BadRowError(where, "no_answer", "field 'final_answer' is missing or empty")
    return Problem(id=str(row.get("id", f"{stem}-{line}")), prompt=_text(row, "question", where, "no_prompt"),
                   answer=gold, source=stem, solution=None,
                   meta={"unit": row.get("unit"), "is_multiple_answer": bool(row.get("is_multiple_answer"))})


BENCHMARK_FORMATS: dict[str, RowMapper] = {
    "math500": _with_solution("problem"),
    "aime24": _with_solution("problem"),
    "amc23": _with_solution("question"),
    "gsm8k": _gsm8k,
    "minerva_math": _minerva,
    "olympiadbench": _olympiad,
}


# Where a user gets each benchmark file: the public source whose rows the format reads as published (JSON Lines,
# one problem a line, the source's own field names).
BENCHMARK_SOURCES: dict[str, str] = {
    "math500": "the MATH-500 split of Hendrycks MATH (Lightman et al.; Hugging Face HuggingFaceH4/MATH-500, "
               "test split): fields problem, solution, answer",
    "aime24": "github.com/QwenLM/Qwen2.5-Math, evaluation/data/aime24/test.jsonl",
    "amc23": "github.com/QwenLM/Qwen2.5-Math, evaluation/data/amc23/test.jsonl",
    "gsm8k": "github.com/openai/grade-school-math, grade_school_math/data/train.jsonl or test.jsonl (Hugging Face "
             "openai/gsm8k, config main): fields question, answer",
    "minerva_math": "github.com/QwenLM/Qwen2.5-Math, evaluation/data/minerva_math/test.jsonl",
    "olympiadbench": "github.com/QwenLM/Qwen2.5-Math, evaluation/data/olympiadbench/test.jsonl",
}


def benchmark_source(path: Path) -> str:
    """Where to get a benchmark file named like ``path`` (by its format), or how to bring a pool of one's own."""
    try:
        return f"download {BENCHMARK_SOURCES[benchmark_format(path)]} and save it as {path}"
    except ValueError:
        return ("a JSONL of your own problems: data.source=jsonl with data.fields mapping its keys to id, prompt, "
                "answer (see --help data)")


def benchmark_format(path: Path, fmt: str = "") -> str:
    if fmt:
        if fmt not in BENCHMARK_FORMATS:
            raise ValueError(f"unknown benchmark format {fmt!r}; known: {', '.join(sorted(BENCHMARK_FORMATS))}")
        return fmt
    for name in sorted(BENCHMARK_FORMATS, key=len, reverse=True):
        if path.stem.startswith(name):
            return name
    raise ValueError(f"{path}: cannot tell the benchmark format from the file name; set data.format "
                     f"({', '.join(sorted(BENCHMARK_FORMATS))})")


MAX_ROW_BYTES = 1_000_000


def jsonl_rows(path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row or BadRowError) for every non-blank line; BOM and CRLF tolerated; a line
    longer than ``max_row_bytes`` is a bad row (``row_too_large``), not parsed. The one JSONL reader: training pools,
    benchmark files and teacher trace files alike."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if len(raw) > max_row_bytes:
                yield number, BadRowError(where, "row_too_large", f"{len(raw)} bytes, above data.max_row_bytes="
                                                                  f"{max_row_bytes}")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadRowError(where, "invalid_utf8", str(exc))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, BadRowError(where, "invalid_json", exc.msg)
                continue
            if not isinstance(row, dict):
                yield number, BadRowError(where, "not_an_object", type(row).__name__)
                continue
            yield number, row


def collect(rows: Iterable[tuple[int, Any]], mapper: RowMapper, stem: str, source: str, on_bad_row: str = "error",
            max_bad_fraction: float = 0.0, limit: int = 0) -> tuple[list[Problem], LoadReport]:
    report = LoadReport(source=source)
    problems: list[Problem] = []
    seen: set[str] = set()
    total = 0
    for number, row in rows:
        total += 1
        try:
            if isinstance(row, BadRowError):
                raise row
            problem = mapper(row, stem, number)
            if problem.id in seen:
                raise BadRowError(f"{source}:{number}", "duplicate_id", f"id {problem.id!r} seen before")
        except BadRowError as err:
            if err.where.split(":")[0] != source:  # mappers name the file by stem: use the real path
                err = BadRowError(f"{source}:{number}", err.reason, str(err).split(": ", 1)[-1])
            if on_bad_row == "error":
                raise err from None
            report.skip(err)
            continue
        seen.add(problem.id)
        problems.append(problem)
        report.where[problem.id] = f"{source}:{number}"
        if limit and len(problems) >= limit:
            break
    report.kept, report.total = len(problems), total
    check_bad_fraction(report, max_bad_fraction)
    return problems, report


def check_bad_fraction(report: LoadReport, max_bad_fraction: float) -> None:
    bad = sum(report.skipped.values())
    if report.total and bad / report.total > max_bad_fraction:
        raise BadRowError(report.source, "too_many_bad_rows",
                          f"{bad} of {report.total} rows are bad, above data.max_bad_fraction={max_bad_fraction}: "
                          + report.summary())


def drop_too_long(problems: list[Problem], report: LoadReport, length: Callable[[Problem], int], context: int,
                  on_bad_row: str = "error", max_bad_fraction: float = 0.0) -> list[Problem]:
    """Problems whose prompt (``length``: its tokens, chat template applied) leaves no room in the model's
    ``context``: an error naming file:line, or skipped and counted as ``prompt_too_long``."""
    kept = []
    for p in problems:
        n = length(p)
        if n < context:
            kept.append(p)
            continue
        err = BadRowError(report.where.get(p.id, f"{report.source}:{p.id}"), "prompt_too_long",
                          f"the prompt is {n} tokens; the model's context is {context}")
        if on_bad_row == "error":
            raise err
        report.skip(err)
    report.kept = len(kept)
    if len(kept) < len(problems):
        check_bad_fraction(report, max_bad_fraction)
    return kept


def load_jsonl(path: str | Path, mapper: Optional[RowMapper] = None, fields: Optional[dict] = None,
               on_bad_row: str = "error", max_bad_fraction: float = 0.0, limit: int = 0,
               max_row_bytes: int = MAX_ROW_BYTES):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    mapper = mapper or field_mapper(fields or {"prompt": "prompt", "answer": "answer"}, str(path))
    return collect(jsonl_rows(path, max_row_bytes), mapper, path.stem, str(path), on_bad_row, max_bad_fraction, limit)


def load_benchmark(path: str | Path, fmt: str = "", on_bad_row: str = "error", max_bad_fraction: float = 0.0,
                   limit: int = 0, max_row_bytes: int = MAX_ROW_BYTES):
    path = Path(path)
    return load_jsonl(path, BENCHMARK_FORMATS[benchmark_format(path, fmt)], on_bad_row=on_bad_row,
                      max_bad_fraction=max_bad_fraction, limit=limit, max_row_bytes=max_row_bytes)


def load_hf(path: str | Path, split: str, fields: dict, on_bad_row: str = "error", max_bad_fraction: float = 0.0,
            limit: int = 0):
    """A Hugging Face dataset from local files: a save_to_disk directory, or a json/jsonl/parquet/csv file."""
    import datasets

    path = Path(path)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    elif path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unsupported file type for data.source=hf")
        dataset = datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
    else:
        raise FileNotFoundError(f"no such dataset: {path}")
    rows = ((i + 1, dict(row)) for i, row in enumerate(dataset))
    return collect(rows, field_mapper(fields, f"{path}[{split}]"), path.stem, f"{path}[{split}]", on_bad_row,
                   max_bad_fraction, limit)


def load_hub(ref, fmt: str, fields: dict, on_bad_row: str = "error", max_bad_fraction: float = 0.0,
             limit: int = 0):
    """A dataset by hub name (or a local directory in the hub's layout): its rows through the benchmark format it is
    known by (or ``fmt``), else through the field map (:mod:`stagewise_pl.data.hub`)."""
    from stagewise_pl.data.hub import format_of, load_rows

    fmt = format_of(ref, fmt)
    mapper = BENCHMARK_FORMATS[benchmark_format(Path(ref.name), fmt)] if fmt else field_mapper(fields, str(ref))
    rows = ((i + 1, dict(row)) for i, row in enumerate(load_rows(ref)))
    return collect(rows, mapper, ref.label, str(ref), on_bad_row, max_bad_fraction, limit)


def filtered(loaded: tuple[list[Problem], LoadReport], text: str) -> tuple[list[Problem], LoadReport]:
    """``loaded`` with the filter ``text`` applied (:func:`stagewise_pl.data.hub.apply_filter`), what it dropped
    counted in the report."""
    from stagewise_pl.data.hub import apply_filter

    problems, report = loaded
    kept, dropped = apply_filter(problems, text)
    if dropped:
        report.filter, report.filtered = text, dropped
        report.kept = len(kept)
    return kept, report


def load_eval_benchmark(entry: str, limit: int = 0, filter_text: str = "") -> tuple[str, list[Problem], LoadReport]:
    """An ``eval.benchmarks`` entry: a JSONL file, or ``hf:NAME[:SUBSET][:SPLIT]``; (its results name, problems,
    report), ``eval.filter`` applied after ``limit``."""
    from stagewise_pl.data.hub import parse_benchmark

    ref = parse_benchmark(entry)
    if ref is None:
        problems, report = filtered(load_benchmark(entry, limit=limit), filter_text)
        return Path(entry).stem, problems, report
    problems, report = filtered(load_hub(ref, "", {"prompt": "prompt", "answer": "answer"}, limit=limit), filter_text)
    return ref.label, problems, report


def saved_locally(path: str) -> bool:
    """A local data file, or a ``save_to_disk`` directory (not a dataset repository's files)."""
    from stagewise_pl.data.hub import saved_to_disk

    local = Path(path).expanduser()
    return local.is_file() or saved_to_disk(local)


def load_pool(data_cfg, task=None) -> tuple[list[Problem], LoadReport]:
    """The training pool that ``data`` describes (``data.filter`` applied after ``data.limit``)."""
    from stagewise_pl.data.hub import HubRef

    skip = data_cfg.skip
    kw = dict(on_bad_row=data_cfg.on_bad_row, max_bad_fraction=data_cfg.max_bad_fraction,
              limit=data_cfg.limit + skip if data_cfg.limit else 0)
    if data_cfg.source == "synthetic":
        problems = task.split(data_cfg.split)
        problems = problems[:kw["limit"]] if kw["limit"] else problems
        loaded = problems, LoadReport(source=f"synthetic[{data_cfg.split}]", kept=len(problems))
    elif data_cfg.source == "jsonl":
        loaded = load_jsonl(data_cfg.path, fields=dict(data_cfg.fields), max_row_bytes=data_cfg.max_row_bytes, **kw)
    elif data_cfg.source == "hf" and saved_locally(data_cfg.path):  # a local file or save_to_disk directory
        loaded = load_hf(data_cfg.path, data_cfg.split, dict(data_cfg.fields), **kw)
    elif data_cfg.source == "hf":  # a hub name, or a local directory in the hub's layout
        name = data_cfg.path[3:] if data_cfg.path.startswith("hf:") else data_cfg.path
        loaded = load_hub(HubRef(name, data_cfg.subset, data_cfg.split), data_cfg.format, dict(data_cfg.fields), **kw)
    else:
        loaded = load_benchmark(data_cfg.path, data_cfg.format, max_row_bytes=data_cfg.max_row_bytes, **kw)
    if skip:  # the first problems left out (data.skip), before the filter as limit is
        problems, report = loaded
        report.source, report.kept = f"{report.source} after the first {skip}", max(0, len(problems) - skip)
        loaded = problems[skip:], report
    return filtered(loaded, data_cfg.filter)
