"""Non-finite losses and gradients: skip the optimizer step, count it, stop after K in a row.

A NaN or infinite loss, or a gradient with one, would write NaN into every weight it touches (AdamW's
moments keep it there). :class:`NonFiniteGuard` is asked before each optimizer step: a bad step is
skipped (gradients dropped, parameters and optimizer moments unchanged, the schedule moves on), counted,
and every rank takes the same decision. ``optim.max_nonfinite_steps`` bad steps in a row raise
:class:`NonFiniteError`: the run stops with a non-zero exit and writes no checkpoint of those steps, so
its ``last.ckpt`` is the last good state. The counts are in the runner's checkpoint state.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from stagewise_pl import dist


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


def grad_norm(params: Iterable[torch.nn.Parameter]) -> Optional[torch.Tensor]:
    """The total L2 norm of the gradients of ``params`` (None when no parameter has one), computed once per step:
    the guard reads its finiteness and gradient clipping scales by it, so the gradients are read once. One
    foreach norm per gradient (bf16/fp16 gradients in float32, float32/64 in their own dtype), then the norm of
    those norms in float64. A NaN or inf entry makes it non-finite; so does a gradient whose float32 norm
    overflows (entries beyond ~1e19), which clipping could not use either."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    low = [g for g in grads if g.dtype in (torch.float16, torch.bfloat16)]
    wide = [g for g in grads if g.dtype not in (torch.float16, torch.bfloat16)]
    norms = (list(torch._foreach_norm(low, 2, dtype=torch.float32)) if low else []) + \
        (list(torch._foreach_norm(wide, 2)) if wide else [])
    return torch.stack([n.to(grads[0].device, torch.float64) for n in norms]).norm()


class NonFiniteGuard:
    def __init__(self, limit: int, where: str):
        self.limit, self.where = max(1, int(limit)), where
        self.skipped = 0  # steps skipped in this phase
        self.in_a_row = 0

    def ok(self, loss: float, norm: Optional[torch.Tensor], step: int) -> bool:
        """True: take the optimizer step. False: skip it (the caller drops the gradients). ``norm`` is the
        gradients' total norm (:func:`grad_norm`; None: no gradient)."""
        finite = math.isfinite(loss) and (norm is None or bool(norm.isfinite()))
        if dist.world_size() > 1:
            finite = all(dist.gather(finite))  # one rank's NaN stops the step everywhere
        if finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"phase {self.where}: {self.in_a_row} optimizer steps in a row (the last at step {step}) had a "
                f"non-finite loss or gradient (optim.max_nonfinite_steps={self.limit}); stopping without a "
                f"checkpoint of them. The last checkpoint holds the last good state: lower the learning rate, "
                f"check the data, then resume=last")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))
