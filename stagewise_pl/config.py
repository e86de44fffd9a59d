"""Loading a run's configuration: YAML files in conf/ merged onto the typed schema, then dotted overrides.

``load_config("default", ["optim.lr=1e-3"])`` reads conf/default.yaml (over the confs it ``extends``), merges it
onto :class:`~stagewise_pl.schema.Config`, applies the dotted overrides and checks every value. An unknown key, a
wrong type, a missing file or a bad value raises :class:`ConfigError` naming the key and where it came from (the
YAML file or the command line) before any work starts. A renamed key (``RENAMED``) is read at its new place with a
deprecation message. The schema itself -- every group, field, default and rule -- is :mod:`stagewise_pl.schema`;
its names are importable from here too.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stagewise_pl.schema import *  # noqa: F401,F403 (the schema's names, importable from here as before)
from stagewise_pl.schema import Config, ConfigError, field_problems

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS_DIR = CONF_DIR / "experiments"  # the experiment files (arms x seeds): python -m stagewise_pl.experiment


def find_conf(name: str) -> Path:
    """conf=NAME: a path to a YAML file, ./conf/NAME.yaml, or the project's conf/NAME.yaml."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    candidates += [Path("conf") / f"{name}.yaml", CONF_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            if is_experiment_conf(path.stem) and path.parent.resolve() in (CONF_DIR, EXPERIMENTS_DIR):
                raise ConfigError(f"conf={name}: {path} describes an experiment (arms x seeds), not a run: "
                                  f"python -m stagewise_pl.experiment --conf {path} runs it")
            return path
    moved = EXPERIMENTS_DIR / f"{Path(name).stem}.yaml"
    if is_experiment_conf(Path(name).stem) and moved.is_file():
        raise ConfigError(f"conf={name}: {moved} describes an experiment (arms x seeds), not a run: "
                          f"python -m stagewise_pl.experiment --conf {moved} runs it")
    raise ConfigError(f"conf={name}: no such file (looked at {', '.join(str(p) for p in candidates)}); "
                      f"available: {', '.join(available_confs())}")


def load_prompts(name: str) -> dict[str, str]:
    """prompts=NAME: conf/prompts/NAME.yaml (or a path to a YAML file) as a dict of templates."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    candidates += [Path("conf") / "prompts" / f"{name}.yaml", CONF_DIR / "prompts" / f"{name}.yaml"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ConfigError(f"prompts={name}: no such file (looked at {', '.join(str(c) for c in candidates)})")
    try:
        prompts = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:
        raise ConfigError(f"prompts={name}: {path} is not valid YAML ({exc})") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ConfigError(f"prompts={name}: {path} must map template names to strings")
    return prompts


def is_experiment_conf(stem: str) -> bool:
    """conf/experiments/experiment.yaml and experiment_*.yaml: files python -m stagewise_pl.experiment reads, not
    the fit."""
    return stem == "experiment" or stem.startswith("experiment_")


def experiment_file(given: str) -> Optional[Path]:
    """``python -m stagewise_pl.experiment --conf GIVEN``: a path to an experiment file, or a name in
    conf/experiments/ (``experiment_skills``); a path of the former layout (``conf/experiment_skills.yaml``, before
    the files moved to conf/experiments/) is found there, with a deprecation message. None when there is none."""
    path = Path(given)
    if path.is_file():
        return path
    if not given.endswith((".yaml", ".yml")) and (EXPERIMENTS_DIR / f"{given}.yaml").is_file():
        return EXPERIMENTS_DIR / f"{given}.yaml"
    moved = EXPERIMENTS_DIR / path.name
    if is_experiment_conf(path.stem) and path.parent.name == "conf" and moved.is_file():
        warnings.warn(f"{given}: the experiment files moved to {EXPERIMENTS_DIR}; {given} is read as {moved}",
                      FutureWarning, stacklevel=2)
        return moved
    return None


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def available_confs() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if not is_experiment_conf(p.stem))


def _merge(base: Any, layer: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from None


def _apply_override(merged: Any, item: str) -> Any:
    """``a.b=value`` (list items by index: ``phases.0.steps=5``), typed by YAML and checked by the schema."""
    source = f"command line ({item})"
    if "=" not in item:
        raise ConfigError(f"command line: {item!r} is not key=value")
    key, _, text = item.partition("=")
    try:
        value = OmegaConf.from_dotlist([f"value={text}"])["value"]
        if isinstance(value, (dict, list)) or OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        OmegaConf.update(merged, key, value, merge=True, force_add=False)
    except (OmegaConfBaseException, TypeError, ValueError, IndexError) as exc:
        full_key = getattr(exc, "full_key", None) or key
        raise ConfigError(f"{source}: key '{full_key}': {str(exc).splitlines()[0]}") from None
    return merged


# old key -> new key: read at the new place, with a deprecation message (a former group that is gone entirely,
# 'stages', is dropped from a conf file once its keys moved)
RENAMED = {"stages.rules": "routing.rules", "stages.callbacks": "trainer.callbacks",
           "grpo.token_budget": "budget.generated_tokens", "grpo.max_prompts_per_step": "budget.max_prompts_per_step"}
FORMER_GROUPS = {"stages"}


def _renamed_key(item: str) -> str:
    """An override of a renamed key, rewritten with a deprecation message."""
    for old, new in RENAMED.items():
        if item == old or item.startswith((old + ".", old + "=")):
            warnings.warn(f"command line: {old} is now {new}; {item!r} is read as {new + item[len(old):]!r}",
                          FutureWarning, stacklevel=3)
            return new + item[len(old):]
    return item


def _renamed_keys(layer: Any, source: str) -> Any:
    """A conf file with renamed keys: each moved to its new place, with a deprecation message."""
    moved = []
    for old, new in RENAMED.items():
        group, key = old.split(".", 1)
        if group in layer and layer[group] is not None and key in layer[group]:
            value = layer[group][key]
            del layer[group][key]
            OmegaConf.update(layer, new, value, force_add=True)
            moved.append(f"{old} -> {new}")
    for group in FORMER_GROUPS & set(layer):
        layer.pop(group)
        moved.append(f"the former group {group!r} dropped")
    if moved:
        warnings.warn(f"{source}: renamed keys read at their new place ({', '.join(moved)}); please update the file",
                      FutureWarning, stacklevel=3)
    return layer


def _read_layer(path: Path) -> Any:
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if layer is None or not isinstance(layer, type(OmegaConf.create({}))):
        raise ConfigError(f"{path}: must hold a mapping of config groups")
    return layer


def _extended(name: Any, path: Path) -> Path:
    """The run conf that ``extends: NAME`` in ``path`` names: NAME.yaml (or the .yaml path NAME) beside ``path``,
    else what ``conf=NAME`` finds."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: extends: {name!r} must name another run conf (a conf name or a .yaml path)")
    beside = path.parent / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    try:
        parent = beside if beside.is_file() else find_conf(name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: extends: {exc}") from None
    if is_experiment_conf(parent.stem):
        raise ConfigError(f"{path}: extends {parent}, an experiment file; a run conf extends a run conf")
    return parent


def conf_layers(path: Path, _chain: tuple = ()) -> list[tuple[Path, Any]]:
    """(file, layer) of a run conf, first what it extends (``extends: NAME``, recursively), then its own: each
    layer is merged over the one before (mappings key by key; a list such as ``phases`` is replaced whole)."""
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(p.name for p in (*_chain, path.resolve()))}")
    layer = _read_layer(path)
    parent = layer.pop("extends", None)
    own = [(path, _renamed_keys(layer, str(path)))]
    if parent is None:
        return own
    return conf_layers(_extended(parent, path), (*_chain, path.resolve())) + own


def load_config(conf: str = "default", overrides: Optional[list[str]] = None) -> Config:
    """Merge conf/<conf>.yaml (over the confs it extends) and ``key=value`` overrides onto :class:`Config`, then
    check values."""
    overrides = list(overrides or [])
    path = find_conf(conf)
    merged = OmegaConf.structured(Config)
    for source, layer in conf_layers(path):
        merged = _merge(merged, layer, str(source))
    for item in overrides:
        merged = _apply_override(merged, _renamed_key(item))
    merged.conf_name = path.stem
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: key '{getattr(exc, 'full_key', '?')}': {exc}") from None
    problems = field_problems(cfg)
    if problems:
        given = {o.split("=", 1)[0] for o in overrides}
        lines = [f"{'command line' if _set_by(key, given) else path}: key '{key}': {msg}" for key, msg in problems]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return cfg


def _set_by(key: str, given: set[str]) -> bool:
    return any(key == g or key.startswith(g + ".") or g.startswith(key + ".") for g in given)


def resolve_run_dir(cfg: Config) -> Path:
    """run.dir, or runs/<conf>-<timestamp> for a fresh run."""
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser()
    return Path("runs") / f"{cfg.conf_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
