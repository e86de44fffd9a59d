"""The experiment file: arms, seeds and budgets, and each arm x seed as a fit's command line.

``conf/experiments/experiment.yaml`` (``--conf PATH`` or a name in conf/experiments/ for another) holds a base conf,
overrides for every arm, the arms (their overrides and phases, each training phase with a ``share`` of the budget's
optimizer steps), the budget (``optimizer_steps``, ``generated_tokens``) and the seeds; ``quick`` replaces the budget
and the seeds and adds overrides for ``--quick``. ``extends: FILE`` starts from another experiment file
(``experiment_skills.yaml`` runs the arms of ``experiment.yaml`` on the skill task; ``arms: {NAME: null}`` leaves an
inherited arm out).
Which phases train (and so take a share) is the phase kinds' trait ``trains``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


class ExperimentError(ValueError):
    """A bad experiment file or argument; the message names it."""


def trains(kind: str) -> bool:
    """A phase of ``kind`` updates the policy, so it takes a share of the optimizer steps (its kind's trait)."""
    from stagewise_pl.phases import kind_traits

    traits = kind_traits([kind])
    if kind not in traits:
        raise ExperimentError(f"unknown phase kind {kind!r}; registered: {', '.join(sorted(traits))}")
    return traits[kind].trains


def token_budgeted(kind: str) -> bool:
    """A phase of ``kind`` spends the token budget (its kind's trait)."""
    from stagewise_pl.phases import kind_traits

    traits = kind_traits([kind])
    return kind in traits and traits[kind].token_budgeted


@dataclass
class Arm:
    name: str
    title: str
    overrides: list[str]
    phases: list[dict]


@dataclass
class Experiment:
    base: str
    seeds: list[int]
    optimizer_steps: int
    generated_tokens: int
    overrides: list[str]
    arms: list[Arm]
    source: str = ""
    quick: bool = False


def load_experiment(path: Path, quick: bool = False) -> Experiment:
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ExperimentError(f"{path}: cannot read ({exc})") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: must hold a mapping")
    unknown = set(raw) - {"base", "seeds", "budget", "overrides", "arms", "quick", "extends"}
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}")
    if raw.get("extends"):
        raw = extend(path, raw)
    if quick:
        q = raw.get("quick") or {}
        if not q:
            raise ExperimentError(f"{path}: --quick needs a 'quick' section")
        raw = dict(raw, seeds=q.get("seeds", raw.get("seeds")), budget={**raw.get("budget", {}), **q.get("budget", {})},
                   overrides=list(raw.get("overrides") or []) + list(q.get("overrides") or []))
    budget = raw.get("budget") or {}
    steps, tokens = budget.get("optimizer_steps"), budget.get("generated_tokens")
    if not isinstance(steps, int) or steps < 1:
        raise ExperimentError(f"{path}: budget.optimizer_steps must be an integer >= 1, got {steps!r}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ExperimentError(f"{path}: budget.generated_tokens must be an integer >= 1, got {tokens!r}")
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ExperimentError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    arms = []
    for name, spec in (raw.get("arms") or {}).items():
        where = f"{path}: arms.{name}"
        if not isinstance(spec, dict) or not spec.get("phases"):
            raise ExperimentError(f"{where}: needs phases")
        for i, phase in enumerate(spec["phases"]):
            if "kind" not in phase:
                raise ExperimentError(f"{where}.phases.{i}: needs a kind")
            if trains(phase["kind"]) and not (isinstance(phase.get("share"), (int, float)) and phase["share"] > 0):
                raise ExperimentError(f"{where}.phases.{i}: a {phase['kind']} phase needs a share > 0 of the "
                                      f"optimizer steps")
            if "steps" in phase or "epochs" in phase:
                raise ExperimentError(f"{where}.phases.{i}: give a share of budget.optimizer_steps, not steps")
        arms.append(Arm(name, spec.get("title", name), list(spec.get("overrides") or []), list(spec["phases"])))
    if not arms:
        raise ExperimentError(f"{path}: no arms")
    return Experiment(raw.get("base", "default"), seeds, steps, tokens, list(raw.get("overrides") or []), arms,
                      str(path), quick)


def extend(path: Path, raw: dict) -> dict:
    """``extends: FILE`` (relative to this file): that experiment's settings, with this file's ``base``, ``seeds``,
    ``budget`` and ``quick`` keys replacing its own, this file's ``overrides`` after its (a later one wins), and this
    file's arms added to its arms (an arm of the same name replaced; ``NAME: null`` leaves that arm out)."""
    from omegaconf import OmegaConf

    parent_path = (Path(path).parent / str(raw["extends"])).resolve()
    if parent_path == Path(path).resolve() or not parent_path.is_file():
        raise ExperimentError(f"{path}: extends: {raw['extends']!r} is not another experiment file")
    try:
        parent = OmegaConf.to_container(OmegaConf.load(parent_path), resolve=True)
    except Exception as exc:
        raise ExperimentError(f"{parent_path}: cannot read ({exc})") from None
    if not isinstance(parent, dict) or parent.get("extends"):
        raise ExperimentError(f"{path}: extends {parent_path.name}, which must be a mapping without an extends of "
                              f"its own")
    out = dict(parent)
    out.update({k: raw[k] for k in ("base", "seeds", "budget") if k in raw})
    out["overrides"] = list(parent.get("overrides") or []) + list(raw.get("overrides") or [])
    out["arms"] = dict(parent.get("arms") or {})
    for name, spec in (raw.get("arms") or {}).items():
        if spec is not None:
            out["arms"][name] = spec
        elif out["arms"].pop(name, None) is None:
            raise ExperimentError(f"{path}: arms.{name}: null leaves out an arm of {parent_path.name}, which has "
                                  f"none of that name; its arms: {', '.join(parent.get('arms') or {}) or 'none'}")
    if "quick" in raw:
        quick = dict(parent.get("quick") or {})
        quick.update({k: v for k, v in (raw["quick"] or {}).items() if k != "overrides"})
        quick["overrides"] = list((parent.get("quick") or {}).get("overrides") or []) + \
            list((raw["quick"] or {}).get("overrides") or [])
        out["quick"] = quick
    return out


def allot(phases: list[dict], total: int) -> list[dict]:
    """The arm's phases with ``steps`` for every training phase: shares of ``total`` turned into integers that sum
    to it exactly (largest remainder, ties to the earlier phase)."""
    shares = [(i, float(p["share"])) for i, p in enumerate(phases) if trains(p["kind"])]
    whole = sum(s for _, s in shares)
    exact = {i: total * s / whole for i, s in shares}
    steps = {i: math.floor(v) for i, v in exact.items()}
    for i in sorted(exact, key=lambda i: (steps[i] - exact[i], i))[:total - sum(steps.values())]:
        steps[i] += 1
    out = []
    for i, p in enumerate(phases):
        q = {k: v for k, v in p.items() if k != "share"}
        if i in steps:
            if steps[i] < 1:
                raise ExperimentError(f"phase {p.get('name', i)}: its share of {total} optimizer steps is 0 steps")
            q["steps"] = steps[i]
        out.append(q)
    return out


def run_dir(root: Path, arm: Arm, seed: int) -> Path:
    return root / arm.name / f"seed-{seed}"


def fit_args(exp: Experiment, arm: Arm, seed: int, root: Path) -> list[str]:
    """The command line of one arm x seed for ``python -m stagewise_pl.fit``."""
    return [f"conf={exp.base}", *exp.overrides, *arm.overrides,
            "phases=" + json.dumps(allot(arm.phases, exp.optimizer_steps)),
            f"budget.generated_tokens={exp.generated_tokens}", f"budget.optimizer_steps={exp.optimizer_steps}",
            f"run.seed={seed}", f"run.dir={run_dir(root, arm, seed)}"]


def check_configs(exp: Experiment, root: Path) -> None:
    """Every run's configuration must load before any run starts."""
    from stagewise_pl.config import ConfigError, load_config

    for arm in exp.arms:
        try:
            load_config(exp.base, fit_args(exp, arm, exp.seeds[0], root)[1:])
        except ConfigError as exc:
            raise ExperimentError(f"arm {arm.name}: {exc}") from None


def resume_args(directory: Path) -> list[str]:
    """A checkpoint: continue from it; a run stopped before its first one: start it over; else a fresh run."""
    ckpts = directory / "checkpoints"
    if (ckpts / "last.ckpt").is_file() or (ckpts / "previous.ckpt").is_file():
        return ["resume=last"]
    return ["resume=restart"] if (directory / "state.json").is_file() else []


def finished(directory: Path) -> bool:
    path = directory / "state.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("finished"))

