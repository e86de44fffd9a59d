"""Fused log-prob kernels: per-token log-probs, entropy and losses without materialising logits.

- :func:`logprobs` -- ``(logp, entropy)`` of the chosen tokens, differentiable (recompute in backward);
- :func:`fused_nll_loss` -- the SFT loss (mean NLL over non-ignored tokens), gradients in forward;
- :func:`fused_policy_loss` -- the GRPO surrogate of :func:`stagewise_pl.losses.policy_loss`,
  gradients in forward;
- :func:`fused_shaped_policy_loss` -- the same with some rows a teacher's off-policy traces under policy shaping
  (:func:`stagewise_pl.losses.shaped_policy_loss`; the ``luffy`` kind).

``backend``: "torch" (everywhere), "triton" (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``),
or "auto" (triton on CUDA when it imports, else torch). See ``linear_logprob.py`` for the method, ``plan.py`` for
the chunk plans. Rows whose target is ignored are left out before the kernels run (their log-prob and entropy are 0
and no gradient flows from them either way): the head's products are then paid for the counted tokens only, not for
an SFT batch's prompts and padding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from stagewise_pl.kernels.linear_logprob import FusedTokenLoss, LinearLogProb, accumulation_dtype
from stagewise_pl.kernels.plan import DEFAULT_BUDGET_BYTES, Plan, device_plan, plan
from stagewise_pl.losses import (PolicyLossConfig, aggregation_weights, clipped_fraction, entropy_weights, k3_kl,
                                 policy_token_loss, shaped_token_loss, tis_weights)

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_SELF_TESTS: dict[str, bool] = {}


def triton_self_test(device: torch.device) -> bool:
    """Once per device: the Triton row ops against the torch ones on a small block. ``auto`` uses
    Triton only if they compile and agree; otherwise it warns and stays on torch."""
    key = str(device)
    if key not in _SELF_TESTS:
        import warnings

        from stagewise_pl.kernels.linear_logprob import TorchRowOps

        try:
            from stagewise_pl.kernels.triton_rows import TritonRowOps

            g = torch.Generator(device="cpu").manual_seed(0)
            z = (torch.randn(5, 300, generator=g) * 3).to(device)
            target = torch.tensor([0, 299, 7, -5, 150], device=device)
            inside = target >= 0
            ok = True
            for with_entropy in (False, True):
                a = TorchRowOps.stats(z.clone(), target, inside, with_entropy)
                b = TritonRowOps.stats(z.clone(), target, inside, with_entropy)
                ok &= all(x is None or torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b))
            lse, h, grad = torch.logsumexp(z, -1), torch.rand(5, device=device), torch.randn(5, device=device)
            ok &= torch.allclose(TorchRowOps.grad_(z.clone(), lse, h, grad, grad, target, inside),
                                 TritonRowOps.grad_(z.clone(), lse, h, grad, grad, target, inside), atol=1e-5)
        except Exception as exc:  # noqa: BLE001  (a kernel that does not compile here must not stop training)
            warnings.warn(f"Triton row ops failed their self-test on {device} ({type(exc).__name__}: {exc}); "
                          f"using the torch kernels")
            ok = False
        else:
            if not ok:
                warnings.warn(f"Triton row ops disagree with the torch ones on {device}; using the torch kernels")
        _SELF_TESTS[key] = bool(ok)
    return _SELF_TESTS[key]


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; one of {BACKENDS}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() and triton_self_test(tensor.device) else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError("kernel backend 'triton' needs triton: pip install triton")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernel backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return backend


def choose_plan(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: Optional[int] = None,
                vocab_block: Optional[int] = None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                single_pass: bool = True) -> Plan:
    """The plan a call gets: explicit sizes or budget -> :func:`plan` (products in float32); otherwise the
    device's (:func:`device_plan`, from the free memory of a CUDA device)."""
    n, h, v = hidden.numel() // hidden.shape[-1], hidden.shape[-1], weight.shape[0]
    if chunk_tokens is not None or vocab_block is not None or budget_bytes != DEFAULT_BUDGET_BYTES:
        return plan(n, v, h, hidden.dtype, budget_bytes, chunk_tokens, vocab_block, single_pass)
    free = torch.cuda.mem_get_info(hidden.device)[0] if hidden.is_cuda else None
    return device_plan(hidden.device.type, hidden.dtype, n, h, v, free, single_pass)


def _prepare(hidden, weight, targets, chunk_tokens, vocab_block, budget_bytes, single_pass=True, chunk_plan=None):
    x = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if x.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {x.shape[0]} tokens, targets {t.shape[0]}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight is {tuple(weight.shape)}, hidden size is {x.shape[1]}")
    if chunk_plan is None:
        chunk_plan = choose_plan(hidden, weight, chunk_tokens, vocab_block, budget_bytes, single_pass)
    return x, t, chunk_plan


def _counted_rows(counted: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the rows whose target counts (``counted``: a bool per row), or None when there is nothing to leave
    out (every row counts, or none does: the kernels then run as given)."""
    keep = counted.nonzero()[:, 0]
    return None if keep.numel() in (0, counted.numel()) else keep


def _take(keep: Optional[torch.Tensor], *rows: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Each of ``rows`` (per-row tensors, or None) at the ``keep`` rows only; as given where ``keep`` is None."""
    return [r if r is None or keep is None else r.index_select(0, keep) for r in rows]


def _spread(values: Optional[torch.Tensor], keep: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Per-row values of the counted rows back at their places among ``n`` rows (0 elsewhere)."""
    if values is None or keep is None:
        return values
    return values.new_zeros(n).index_copy(0, keep, values)


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor] = None,
             temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False, *, backend: str = "auto",
             chunk_tokens: Optional[int] = None, vocab_block: Optional[int] = None,
             budget_bytes: int = DEFAULT_BUDGET_BYTES,
             chunk_plan: Optional[Plan] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets] and optionally the entropy.

    hidden (..., H), weight (V, H), targets (...): returns tensors of targets' shape; 0 where
    ``targets == ignore_index`` (and no gradient flows from those rows). ``chunk_plan``: a :class:`Plan` used as
    it is (tests, benchmarks); by default :func:`choose_plan`'s.
    """
    x, t, chunk_plan = _prepare(hidden, weight, targets, chunk_tokens, vocab_block, budget_bytes, single_pass=False,
                                chunk_plan=chunk_plan)
    n, keep = t.shape[0], _counted_rows(t != ignore_index)
    x, t = _take(keep, x, t)
    logp, entropy = LinearLogProb.apply(x, weight, bias, t, float(temperature), ignore_index, with_entropy,
                                        chunk_plan, resolve_backend(backend, hidden))
    logp, entropy = _spread(logp, keep, n), _spread(entropy, keep, n)
    return logp.view(targets.shape), (entropy.view(targets.shape) if entropy is not None else None)


def fused_nll_loss(hidden, weight, targets, bias=None, ignore_index: int = -100, temperature: float = 1.0, *,
                   backend: str = "auto", chunk_tokens=None, vocab_block=None,
                   budget_bytes: int = DEFAULT_BUDGET_BYTES, chunk_plan: Optional[Plan] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT loss: mean negative log-likelihood of the non-ignored targets, and their count."""
    x, t, chunk_plan = _prepare(hidden, weight, targets, chunk_tokens, vocab_block, budget_bytes,
                                chunk_plan=chunk_plan)
    counted = t != ignore_index
    count = counted.sum()
    scale = 1.0 / count.clamp(min=1).to(accumulation_dtype(hidden))
    x, t = _take(_counted_rows(counted), x, t)

    def token_loss(logp, entropy, rows):
        return -logp.sum() * scale

    loss, _, _ = FusedTokenLoss.apply(x, weight, bias, t, float(temperature), ignore_index, False, chunk_plan,
                                      resolve_backend(backend, hidden), token_loss)
    return loss, count


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    logp: torch.Tensor  # (B, T) detached
    entropy: Optional[torch.Tensor]  # (B, T) detached, when computed
    clip_fraction: torch.Tensor  # fraction of completion tokens whose ratio was clipped


def fused_policy_loss(hidden, weight, targets, old_logp, advantages, mask, cfg: PolicyLossConfig,
                      ref_logp=None, bias=None, temperature: float = 1.0, with_entropy: Optional[bool] = None, *,
                      weights: Optional[torch.Tensor] = None, entropy_weight: Optional[torch.Tensor] = None,
                      backend: str = "auto", chunk_tokens=None, vocab_block=None,
                      budget_bytes: int = DEFAULT_BUDGET_BYTES, chunk_plan: Optional[Plan] = None,
                      rollout_logp: Optional[torch.Tensor] = None, tis_cap: float = 0.0) -> PolicyLossOutput:
    """:func:`stagewise_pl.losses.policy_loss` computed from hidden states (B, T, H), gradients in forward.

    targets, old_logp, mask (and ref_logp) are (B, T); advantages (B,) or (B, T). Tokens with mask 0
    contribute nothing (their targets may be anything in range). ``old_logp=None`` means on-policy:
    the old log-probs are the current ones (ratio 1, no second forward pass). ``weights`` (B, T)
    replaces the aggregation weights of ``cfg``: a mini-batch split into micro-batches passes each
    micro-batch its slice of the mini-batch's weights, so the accumulated gradient equals the
    mini-batch's; ``entropy_weight`` (B, T) does the same for the entropy bonus's token mean.
    ``clip_fraction`` counts the tokens where the clip is active (see
    :func:`stagewise_pl.losses.clipped_fraction`). ``tis_cap`` > 0 with ``rollout_logp`` (B, T), the log-probs the
    rollout engine sampled the targets with: truncated importance sampling, each token's advantage (so its
    policy-gradient term, not the KL) weighted by min(exp(old - rollout_logp), tis_cap), old being ``old_logp`` or,
    on-policy, the current log-prob detached (:func:`stagewise_pl.losses.tis_weights`).
    """
    return _policy_loss(hidden, weight, targets, old_logp, advantages, mask, cfg, ref_logp, bias, temperature,
                        with_entropy, weights, entropy_weight, backend, chunk_tokens, vocab_block, budget_bytes,
                        chunk_plan, rollout_logp, tis_cap, None, 0.0)


def fused_shaped_policy_loss(hidden, weight, targets, old_logp, advantages, mask, off_policy: torch.Tensor,
                             cfg: PolicyLossConfig, gamma: float, ref_logp=None, bias=None, temperature: float = 1.0,
                             with_entropy: Optional[bool] = None, *, weights: Optional[torch.Tensor] = None,
                             entropy_weight: Optional[torch.Tensor] = None, backend: str = "auto",
                             chunk_tokens=None, vocab_block=None, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                             chunk_plan: Optional[Plan] = None, rollout_logp: Optional[torch.Tensor] = None,
                             tis_cap: float = 0.0) -> PolicyLossOutput:
    """The second loss path: :func:`stagewise_pl.losses.shaped_policy_loss` from hidden states, through the same
    fused kernel as :func:`fused_policy_loss` (same arguments, same meaning). Rows with ``off_policy`` (B,) True are
    a teacher's traces in the group (LUFFY): their tokens take -A pi / (pi + ``gamma``), no ratio and no clip, and no
    TIS weight (the engine did not sample them); the other rows the clipped surrogate. ``clip_fraction`` is over the
    on-policy tokens."""
    if off_policy.shape != targets.shape[:1]:
        raise ValueError(f"off_policy must be one flag per row, {tuple(targets.shape[:1])}; got "
                         f"{tuple(off_policy.shape)}")
    if gamma <= 0:
        raise ValueError(f"policy shaping needs gamma > 0, got {gamma}")
    return _policy_loss(hidden, weight, targets, old_logp, advantages, mask, cfg, ref_logp, bias, temperature,
                        with_entropy, weights, entropy_weight, backend, chunk_tokens, vocab_block, budget_bytes,
                        chunk_plan, rollout_logp, tis_cap, off_policy, float(gamma))


def _policy_loss(hidden, weight, targets, old_logp, advantages, mask, cfg, ref_logp, bias, temperature, with_entropy,
                 weights, entropy_weight, backend, chunk_tokens, vocab_block, budget_bytes, chunk_plan, rollout_logp,
                 tis_cap, off_policy, gamma) -> PolicyLossOutput:
    """Both paths' body; ``off_policy`` None: the clipped surrogate on every token (the ops as they always were)."""
    if cfg.beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if tis_cap and rollout_logp is None:
        raise ValueError("tis_cap > 0 needs rollout_logp")
    with_entropy = bool(cfg.entropy_coef) if with_entropy is None else with_entropy
    if advantages.dim() == targets.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    acc = accumulation_dtype(hidden)
    weights = (aggregation_weights(mask.to(acc), cfg) if weights is None else weights.to(acc) * mask.to(acc)
               ).reshape(-1)
    ent_w = (entropy_weights(mask.to(acc)) if entropy_weight is None else entropy_weight.to(acc) * mask.to(acc)
             ).reshape(-1)
    old = None if old_logp is None else old_logp.reshape(-1).to(acc)
    adv = advantages.expand_as(targets).reshape(-1).to(acc)
    ref = None if ref_logp is None else ref_logp.reshape(-1).to(acc)
    behaviour = rollout_logp.reshape(-1).to(acc) if tis_cap else None
    off = None if off_policy is None else off_policy.bool().reshape(-1, 1).expand_as(targets).reshape(-1)
    masked_targets = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
    x, t, chunk_plan = _prepare(hidden, weight, masked_targets, chunk_tokens, vocab_block, budget_bytes,
                                chunk_plan=chunk_plan)
    counted = t != -100
    n, keep = t.shape[0], _counted_rows(counted)
    # the rows the kernel sees, and the per-row terms of its token loss, counted rows only when some are left out
    xk, tk, oldk, advk, refk, wk, entk, behk, offk = _take(keep, x, t, old, adv, ref, weights, ent_w, behaviour, off)

    def token_loss(logp, entropy, rows):
        old_rows = logp.detach() if oldk is None else oldk[rows]
        adv_rows = advk[rows] if behk is None else advk[rows] * tis_weights(old_rows, behk[rows], tis_cap)
        if offk is None:
            terms = policy_token_loss(logp, old_rows, adv_rows, cfg, None if refk is None else refk[rows])
        else:  # the trace rows: shaped, with their plain advantage (no TIS: the engine did not sample them)
            on = policy_token_loss(logp, old_rows, adv_rows, cfg, None if refk is None else refk[rows])
            shaped = shaped_token_loss(logp, advk[rows], gamma)
            if cfg.beta:
                shaped = shaped + cfg.beta * k3_kl(logp, refk[rows])
            terms = torch.where(offk[rows], shaped, on)
        loss = (wk[rows] * terms).sum()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * (entk[rows] * entropy).sum()
        return loss

    loss, logp, entropy = FusedTokenLoss.apply(xk, weight, bias, tk, float(temperature), -100, with_entropy,
                                               chunk_plan, resolve_backend(backend, hidden), token_loss)
    logp, entropy = _spread(logp, keep, n), _spread(entropy, keep, n)
    ratio = torch.exp(logp - old) if old is not None else torch.ones_like(logp)
    on_policy = counted if off is None else counted & ~off
    clip_fraction = clipped_fraction(ratio, adv, on_policy.to(acc), cfg.epsilon_low, cfg.epsilon_high)
    return PolicyLossOutput(loss, logp.view(targets.shape), None if entropy is None else entropy.view(targets.shape),
                            clip_fraction)


__all__ = ["logprobs", "fused_nll_loss", "fused_policy_loss", "fused_shaped_policy_loss", "PolicyLossOutput",
           "PolicyLossConfig", "Plan",
           "choose_plan", "device_plan", "resolve_backend", "triton_available"]
