"""Checks before any slow work, shared by ``--dry-run`` and the run: the plan with its kinds' traits, the teacher
and the prompt templates, the files a run will read, and digests that tell whether a resumed run is the same."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stagewise_pl.config import Config, ConfigError


def plan_phases(cfg: Config, rules=None) -> list:
    """The checked plan (see :func:`stagewise_pl.plan.build_plan`)."""
    from stagewise_pl.phases import kind_traits
    from stagewise_pl.plan import build_plan, rule_info
    from stagewise_pl.routing import make_rules

    rules = make_rules(cfg.routing.rules) if rules is None else rules
    from stagewise_pl.routing.gate import gates_of

    if gates_of(rules) and not cfg.data.dev_size:
        raise ConfigError("routing.rules: a phase gate judges phases by the development split; set data.dev_size "
                          "(problems taken from the pool into it), e.g. data.dev_size=64")
    traits = kind_traits(p.kind for p in cfg.phases)
    phases = build_plan(cfg.phases, traits, [rule_info(r) for r in rules])
    check_step_budget(cfg.budget.optimizer_steps, phases, traits)
    return phases


def check_step_budget(total: int, phases, traits) -> None:
    """``budget.optimizer_steps``: the training phases' ``steps`` sum to at most ``total`` (0: no check); a training
    phase given in epochs has no step count before it runs, so it is refused while a budget is set."""
    if not total:
        return
    training = [s for s in phases if traits[s.kind].trains]
    by_epochs = [s.name for s in training if s.epochs > 0]
    if by_epochs:
        raise ConfigError(f"budget.optimizer_steps={total}: phase(s) {', '.join(by_epochs)} train for epochs, whose "
                          f"steps are not known before the run; give them steps")
    used = sum(s.steps for s in training)
    if used > total:
        raise ConfigError(f"budget.optimizer_steps={total}: the plan's training phases take {used} steps ("
                          + ", ".join(f"{s.name} {s.steps}" for s in training) + ")")


def plan_traits(phases) -> dict:
    from stagewise_pl.phases import kind_traits

    return kind_traits(s.kind for s in phases)


def pool_digest(problems) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\x00{p.prompt}\x00{p.answer}\x01".encode())
    return h.hexdigest()[:16]


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(v, dict) for v in d):  # the plan: phases.1.steps
        out = {f"{prefix}length": len(d)}
        for i, v in enumerate(d):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def uses_teacher(phases) -> bool:
    traits = plan_traits(phases)
    return any(traits[s.kind].uses_teacher for s in phases)


def check_teaching(cfg: Config, phases) -> dict:
    """With phases that use the teacher: the prompt templates (returned), the teacher, the critic and the bridge
    strategy must resolve before any work; {} without such phases."""
    if not uses_teacher(phases):
        return {}
    from stagewise_pl.bridge import BRIDGES
    from stagewise_pl.config import load_prompts
    from stagewise_pl.teachers import TEACHERS

    prompts = load_prompts(cfg.prompts)
    for key, name in (("teacher.name", cfg.teacher.name), ("teacher.critic", cfg.teacher.critic),
                      ("bridge.strategy", cfg.bridge.strategy)):
        if name:
            try:
                (BRIDGES if key == "bridge.strategy" else TEACHERS).get(name)
            except (KeyError, ImportError) as exc:
                raise ConfigError(f"{key}: {exc.args[0] if exc.args else exc}") from None
    return prompts


def how_to_get(what: str, path: Path, cfg: Config) -> str:
    """Where a user gets a file the run reads (printed by ``--dry-run`` when it is missing)."""
    if what == "model.name_or_path":
        from stagewise_pl.models.packaged import how_to_get as model_how_to_get

        return model_how_to_get(cfg.model.name_or_path)
    if what.startswith("teacher."):
        return ("make it from a large model behind an OpenAI-compatible server: python tools/make_traces.py "
                f"--base-url URL --model NAME --out {path} conf={cfg.conf_name or 'NAME'} (the same overrides)")
    from stagewise_pl.data.loaders import benchmark_source

    return benchmark_source(path)


def referenced_datasets(cfg: Config) -> list[tuple[str, str]]:
    """(what, where from and how read) for every dataset the run loads by hub name (``--dry-run``): the pool with
    ``data.source=hf`` (unless a local file or save_to_disk directory) and the ``hf:`` entries of eval.benchmarks."""
    from stagewise_pl.data.hub import HubRef, describe, parse_benchmark
    from stagewise_pl.data.loaders import saved_locally

    out = []
    if cfg.data.source == "hf" and cfg.data.path and not saved_locally(cfg.data.path):
        name = cfg.data.path[3:] if cfg.data.path.startswith("hf:") else cfg.data.path
        out.append(("data.path", describe(HubRef(name, cfg.data.subset, cfg.data.split), cfg.data.format)))
    out += [("eval.benchmarks", describe(parse_benchmark(b))) for b in cfg.eval.benchmarks if b.startswith("hf:")]
    return out


def referenced_files(cfg: Config, phases) -> list[tuple[str, Path, bool]]:
    """(what, path, exists) for every file the run will read: a GGUF model, the pool, evaluation sets, a trace
    file."""
    files = []
    from stagewise_pl.models.packaged import is_packaged, locate

    if is_packaged(cfg.model.name_or_path):  # a GGUF from a pip package or a path, converted at set-up
        found = locate(cfg.model.name_or_path)
        files.append(("model.name_or_path", found or Path(cfg.model.name_or_path), found is not None))
    if cfg.data.source in ("jsonl", "benchmark"):
        files.append(("data.path", Path(cfg.data.path).expanduser(), Path(cfg.data.path).expanduser().exists()))
    files += [("eval.benchmarks", Path(b).expanduser(), Path(b).expanduser().is_file()) for b in cfg.eval.benchmarks
              if not b.startswith("hf:")]
    if uses_teacher(phases):
        for key, name, args in (("teacher.args.path", cfg.teacher.name, cfg.teacher.args),
                                ("teacher.critic_args.path", cfg.teacher.critic, cfg.teacher.critic_args)):
            if name == "trace_file" and args.get("path"):
                files.append((key, Path(args["path"]).expanduser(), Path(args["path"]).expanduser().is_file()))
    return files
