"""The precision the rollout engine samples in (``rollout.dtype``), and how ``auto`` decides it.

``model`` samples in the policy's own dtype (what every run did before this option). ``float32`` and ``bfloat16``
say it outright. ``auto`` takes bfloat16 on a GPU that has it, and on a CPU whose bfloat16 products measure at least
:data:`AUTO_MIN_SPEEDUP` times float32's at the model's decode shape (CPUs with AVX-512 BF16 or AMX; one without
them computes bfloat16 products no faster, or slower, than float32). A measurement can differ from one machine to
the next, so the decision is written once into the run directory (``rollout_dtype.json``) and a resumed run reads
it back: a run samples in one precision from its first step to its last, and the same-seed promise holds within it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from stagewise_pl import dist
from stagewise_pl.io import atomic_write

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AUTO_MIN_SPEEDUP = 1.5
RECORD = "rollout_dtype.json"


def product_speedup(hidden: int, intermediate: int, rows: int = 64, repeats: int = 5) -> float:
    """bfloat16 over float32 speed of one decode-shaped product (rows x hidden x intermediate) on this CPU, best
    of ``repeats`` timings of each."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, hidden, generator=gen), torch.randn(hidden, intermediate, generator=gen)

    def best(x, y) -> float:
        torch.mm(x, y)  # oneDNN builds its kernel on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(x, y)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)


def decide_auto(model) -> tuple[str, str]:
    """(dtype name, why) for ``auto`` on this machine."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bfloat16" if ok else "float32"), f"GPU {'with' if ok else 'without'} bfloat16"
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 512) or 512)
    speedup = product_speedup(hidden, int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden))
    chosen = "bfloat16" if speedup >= AUTO_MIN_SPEEDUP else "float32"
    return chosen, f"CPU: bfloat16 products {speedup:.2f}x float32's at the decode shape (bfloat16 from " \
                   f"{AUTO_MIN_SPEEDUP}x)"


def rollout_dtype(setting: str, model, record_dir: Optional[Path] = None,
                  log: Callable[..., None] = print) -> Optional[torch.dtype]:
    """The dtype the engine samples in for ``rollout.dtype=setting`` (None: the policy's own). ``auto`` is decided
    on rank 0, sent to every rank and recorded in ``record_dir`` (read back from there when a run resumes)."""
    if setting == "model":
        return None
    if setting in DTYPES:
        return DTYPES[setting]
    if setting != "auto":
        raise ValueError(f"rollout.dtype={setting!r}: one of model, float32, bfloat16, auto")
    record = Path(record_dir) / RECORD if record_dir is not None else None
    decision = None
    if dist.is_main():
        if record is not None and record.is_file():
            decision = json.loads(record.read_text())
            decision["why"] = f"as this run decided at its start ({decision['why']})"
        else:
            name, why = decide_auto(model)
            decision = {"dtype": name, "why": why}
            if record is not None:
                atomic_write(record, json.dumps(decision, indent=1) + "\n")
    decision = dist.broadcast(decision)
    log(f"rollout.dtype=auto: sampling in {decision['dtype']} ({decision['why']})")
    return DTYPES[decision["dtype"]]
