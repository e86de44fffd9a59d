"""Datasets named by their Hugging Face hub name, and filters on loaded problems.

A pool (``data.source=hf data.path=openai/gsm8k data.subset=main data.split=train``) or a held-out benchmark
(``eval.benchmarks: [hf:openai/gsm8k:main:test]``) named this way is loaded by ``datasets.load_dataset`` -- from the
user's network or their datasets cache; nothing here downloads by itself. A local directory in the hub's layout (a
dataset repository's files with its README's ``configs``) loads the same way, offline, and so does a
``save_to_disk`` directory. Rows become :class:`~stagewise_pl.data.problems.Problem` through the benchmark format
the name is known by (:data:`HUB_FORMATS`, or ``data.format``), else through ``data.fields``.

:func:`parse_filter` / :func:`apply_filter`: ``data.filter`` / ``eval.filter``, conditions on a measure of each
problem joined by commas (``calculator_steps<=2``); what a filter drops is counted in the load report.
"""
from __future__ import annotations

import operator
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from stagewise_pl.data.problems import Problem

# Hub datasets whose rows the benchmark formats read as published (checked against the datasets' cards).
HUB_FORMATS: dict[str, str] = {
    "openai/gsm8k": "gsm8k",  # config main: question, answer ("... #### N"); splits train, test
    "HuggingFaceH4/MATH-500": "math500",  # problem, solution, answer, level, unique_id; split test
    "HuggingFaceH4/aime_2024": "aime24",  # id, problem, solution, answer; split train
    "math-ai/amc23": "amc23",  # id, question, answer; split test
}


# the names of data.loaders.BENCHMARK_FORMATS (spelled here so that this module imports nothing of loaders; a test
# keeps the two equal)
FORMAT_NAMES = ("math500", "aime24", "amc23", "gsm8k", "minerva_math", "olympiadbench")


class HubError(RuntimeError):
    """A dataset named by its hub name could not be loaded; the message names it and what to do offline."""


@dataclass(frozen=True)
class HubRef:
    """A dataset by hub name (or a local directory in the hub's layout), its subset (config) and split."""

    name: str
    subset: str = ""
    split: str = "train"

    @property
    def label(self) -> str:
        """A short name for results files: the dataset's name and split (``gsm8k_test``)."""
        return f"{self.name.rstrip('/').split('/')[-1]}_{self.split}"

    def __str__(self) -> str:
        return f"hf:{self.name}:{self.subset}:{self.split}"


def parse_benchmark(entry: str) -> Optional[HubRef]:
    """``hf:NAME[:SUBSET][:SPLIT]`` (split default ``test``) -> HubRef; None for a plain file path."""
    if not entry.startswith("hf:"):
        return None
    parts = entry[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"{entry!r}: a hub benchmark is hf:NAME[:SUBSET][:SPLIT], e.g. hf:openai/gsm8k:main:test")
    name, subset, split = (parts + ["", ""])[:3]
    return HubRef(name, subset, split or "test")


def format_of(ref: HubRef, fmt: str = "") -> str:
    """The benchmark format a hub dataset's rows are read with: ``fmt`` if given, else the known name's, else a
    format the name's last part starts with (a local copy in a directory named gsm8k); '' = the field map."""
    if fmt or ref.name in HUB_FORMATS:
        return fmt or HUB_FORMATS[ref.name]
    last = ref.name.rstrip("/").split("/")[-1].lower()
    return next((f for f in sorted(FORMAT_NAMES, key=len, reverse=True) if last.startswith(f)), "")


def describe(ref: HubRef, fmt: str = "") -> str:
    """Where ``ref`` comes from and how its rows are read (``--dry-run``)."""
    local = Path(ref.name).expanduser()
    where = f"the local directory {local}" if local.is_dir() else \
        f"the Hugging Face hub (https://huggingface.co/datasets/{ref.name}) or the datasets cache"
    how = f"format {format_of(ref, fmt)}" if format_of(ref, fmt) else "the field map data.fields"
    return f"{ref}: datasets.load_dataset from {where}, rows read as {how}"


def saved_to_disk(path: Path) -> bool:
    """A directory ``datasets``' ``save_to_disk`` wrote (read by ``load_from_disk``, not ``load_dataset``)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def load_rows(ref: HubRef) -> list[dict]:
    """The rows of ``ref``'s split: a ``save_to_disk`` directory, or ``datasets.load_dataset`` (the hub, its cache,
    or a local directory in the hub's layout). A local directory is read through a cache of its own, removed after:
    the datasets cache keys a local directory by its name and layout, not by its files' content, so a second
    directory of the same name (or the same one edited) would be answered from the first one's cache."""
    import datasets

    local = Path(ref.name).expanduser()
    try:
        if saved_to_disk(local):
            loaded = datasets.load_from_disk(str(local))
            return (loaded[ref.split] if isinstance(loaded, datasets.DatasetDict) else loaded).to_list()
        if not local.is_dir():
            return datasets.load_dataset(ref.name, ref.subset or None, split=ref.split).to_list()
        with tempfile.TemporaryDirectory(prefix="stagewise-dataset-") as cache:
            return datasets.load_dataset(str(local), ref.subset or None, split=ref.split, cache_dir=cache).to_list()
    except Exception as exc:  # noqa: BLE001  (datasets raises many kinds: say which dataset and what to do)
        raise HubError(
            f"cannot load the dataset {ref.name!r} (subset {ref.subset or '-'}, split {ref.split}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. A hub name needs the network or "
            f"the datasets cache (HF_DATASETS_CACHE); offline, save its rows as JSON Lines where there is a network "
            f"and point data.path (or the eval.benchmarks entry) at that file") from None


# ------------------------------------------------------------------ filters on loaded problems
def calculator_steps(problem: Problem) -> Optional[float]:
    """GSM8K's calculator annotations in the worked solution (<<48/2=24>>): how many operations it takes."""
    value = problem.meta.get("calculator_steps")
    return None if value is None else float(value)


def level_of(problem: Problem) -> Optional[float]:
    try:
        return float(problem.level) if problem.level is not None else None
    except ValueError:
        return None


MEASURES: dict[str, Callable[[Problem], Optional[float]]] = {
    "calculator_steps": calculator_steps,
    "level": level_of,
    "prompt_chars": lambda p: float(len(p.prompt)),
    "answer_chars": lambda p: float(len(p.answer)),
}
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
        ">": operator.gt}
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|==|!=|<|>)\s*(-?\d+(?:\.\d+)?)\s*$")


def parse_filter(text: str) -> list[tuple[str, str, float]]:
    """``measure OP number[, ...]`` -> conditions; a clear ValueError for anything else."""
    out = []
    for part in [p for p in text.split(",") if p.strip()]:
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(f"filter condition {part.strip()!r}: expected MEASURE OP NUMBER (OP one of "
                             f"{', '.join(_OPS)}), e.g. calculator_steps<=2")
        if m.group(1) not in MEASURES:
            raise ValueError(f"filter condition {part.strip()!r}: unknown measure {m.group(1)!r}; known: "
                             f"{', '.join(MEASURES)}")
        out.append((m.group(1), m.group(2), float(m.group(3))))
    return out


def apply_filter(problems: list[Problem], text: str) -> tuple[list[Problem], dict[str, int]]:
    """The problems meeting every condition of ``text`` ('' = all), and what was dropped: ``dropped`` (failed a
    condition) and ``no_<measure>`` (the problem has no such measure, e.g. a pool without calculator annotations)."""
    conditions = parse_filter(text)
    if not conditions:
        return problems, {}
    kept, dropped = [], {"dropped": 0}
    for p in problems:
        ok = True
        for name, op, bound in conditions:
            value = MEASURES[name](p)
            if value is None:
                dropped[f"no_{name}"] = dropped.get(f"no_{name}", 0) + 1
                ok = False
                break
            if not _OPS[op](value, bound):
                dropped["dropped"] += 1
                ok = False
                break
        if ok:
            kept.append(p)
    return kept, dropped
