"""Our GRPO policy loss against TRL's own ``GRPOTrainer._compute_loss`` on identical inputs.

TRL's loss is called, not re-typed: a bare ``GRPOTrainer`` is made with ``object.__new__`` and given
only the attributes ``_compute_loss`` reads (see :func:`trl_trainer`); its model call
(``_get_per_token_logps_and_entropies``) is replaced on the instance by one that returns the
per-token log-probs under test. Everything runs in float64 and must agree to 1e-6, loss and gradient.

Mapping (one process, gradient accumulation 1, steps_per_generation 1):
  grpo -> seq_mean_token_mean;  bnpo, dapo -> token_mean;  dr_grpo -> constant with max_tokens =
  TRL's max_completion_length (larger than the tensors' T, so the two normalisers are told apart).
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trl import GRPOTrainer  # noqa: E402

from stagewise_pl.kernels import fused_policy_loss  # noqa: E402
from stagewise_pl.losses import PolicyLossConfig, aggregation_weights, policy_loss, policy_token_loss  # noqa: E402

B, T, H, V, P = 6, 7, 16, 50, 3  # sequences, completion tokens, hidden size, vocabulary, prompt tokens
MAX_COMPLETION_LENGTH = 12  # > T: dr_grpo's constant must be this, not the padded length
EPS_LOW, EPS_HIGH = 0.2, 0.28  # clip-higher
TOL = 1e-6

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
AGGREGATION = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "constant"}


# ------------------------------------------------------------------------------------------- TRL side
class _Accelerator:
    """What ``_compute_loss`` asks of accelerate, for one process."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def reduce(tensor, reduction="sum"):
        assert reduction == "sum", reduction
        return tensor


def trl_trainer(loss_type: str, beta: float, *, grad_accum: int = 1, steps_per_generation: int = 1,
                entropy_coef: float = 0.0) -> GRPOTrainer:
    """A GRPOTrainer with no model, dataset or accelerate: just the state ``_compute_loss`` reads.

    Anything else it reads raises AttributeError, so a TRL change that adds a read fails loudly.
    """
    assert GRPOTrainer._compute_loss.__module__ == "trl.trainer.grpo_trainer"  # TRL's own code, not a copy
    trainer = object.__new__(GRPOTrainer)
    trainer.loss_type = loss_type
    trainer.beta = beta
    trainer.epsilon_low = EPS_LOW
    trainer.epsilon_high = EPS_HIGH
    trainer.importance_sampling_level = "token"
    trainer.top_entropy_quantile = 1.0  # no entropy mask
    trainer.off_policy_mask_threshold = None  # no off-policy sequence mask
    trainer.use_vllm = False  # no vLLM importance-sampling correction
    trainer.max_completion_length = MAX_COMPLETION_LENGTH
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = bool(entropy_coef)
    trainer.entropy_coef = entropy_coef
    trainer.use_adaptive_entropy = False
    trainer.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=steps_per_generation)
    trainer.accelerator = _Accelerator()
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    trainer.model = SimpleNamespace(training=True)
    return trainer


def trl_loss(trainer: GRPOTrainer, logp, old_logp, advantages, mask, ref_logp, entropy=None,
             num_items_in_batch=None) -> torch.Tensor:
    """``trainer._compute_loss`` with the model's per-token log-probs replaced by ``logp`` (B, T)."""
    b, t = logp.shape
    completion_mask = mask.long()  # TRL's completion masks are integer tensors
    entropy = torch.rand(b, t, dtype=logp.dtype, generator=torch.Generator().manual_seed(1)) if entropy is None \
        else entropy

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert input_ids.shape == (b, P + t) and attention_mask.shape == (b, P + t) and logits_to_keep == t
        assert kwargs.get("compute_entropy") is True
        return logp, entropy, None

    trainer._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    inputs = {
        "prompt_ids": torch.randint(0, V, (b, P), generator=torch.Generator().manual_seed(2)),
        "prompt_mask": torch.ones(b, P, dtype=torch.long),
        "completion_ids": torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(3)),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "ref_per_token_logps": ref_logp,
        "num_items_in_batch": completion_mask.sum() if num_items_in_batch is None else num_items_in_batch,
    }
    loss = trainer._compute_loss(None, inputs)
    assert "clip_ratio/region_mean" in trainer._metrics["train"]  # the clipped-surrogate branch ran
    return loss


# ------------------------------------------------------------------------------------------- inputs
def ragged_mask(g: torch.Generator, b: int = B, t: int = T) -> torch.Tensor:
    """Each row has 1..t leading ones; row 0 is full."""
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    return (torch.arange(t) < lengths[:, None]).double()


def signed_advantages(g: torch.Generator, b: int = B) -> torch.Tensor:
    """Both signs: even rows positive, odd rows negative."""
    a = torch.randn(b, generator=g, dtype=torch.float64).abs() + 0.1
    a[1::2] *= -1
    return a


def assert_clipping_happened(logp, old_logp, advantages, mask):
    """Both clip sides are active (the clipped term is the min, so the token has no surrogate gradient)
    on at least one completion token each, so the comparison covers clipping."""
    ratio = torch.exp(logp.detach() - old_logp)
    adv = advantages[:, None]
    on = mask.bool()
    assert ((ratio > 1 + EPS_HIGH) & (adv > 0) & on).any(), "no token clipped high"
    assert ((ratio < 1 - EPS_LOW) & (adv < 0) & on).any(), "no token clipped low"
    assert ((ratio >= 1 - EPS_LOW) & (ratio <= 1 + EPS_HIGH) & on).any(), "no unclipped token"


def our_cfg(loss_type: str, beta: float, entropy_coef: float = 0.0) -> PolicyLossConfig:
    return PolicyLossConfig(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, aggregation=AGGREGATION[loss_type],
                            max_tokens=MAX_COMPLETION_LENGTH if loss_type == "dr_grpo" else None, beta=beta,
                            entropy_coef=entropy_coef)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def logp_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(g)
    logp = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = signed_advantages(g)
    assert_clipping_happened(logp, old, advantages, mask)
    return logp, old, ref, advantages, mask


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_trl(loss_type, beta, seed):
    logp, old, ref, advantages, mask = logp_inputs(seed)

    theirs = trl_loss(trl_trainer(loss_type, beta), logp, old, advantages, mask, ref)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    ours = policy_loss(logp, old, advantages, mask, our_cfg(loss_type, beta), ref_logp=ref)
    (our_grad,) = torch.autograd.grad(ours, logp)

    assert theirs.dtype == ours.dtype == torch.float64
    assert max_abs(ours, theirs) <= TOL, (ours.item(), theirs.item())
    assert max_abs(our_grad, their_grad) <= TOL
    assert their_grad.abs().sum() > 0 and (our_grad[mask == 0] == 0).all()


def test_dr_grpo_uses_max_completion_length_not_padded_length():
    """Not vacuous: with the padded length as constant, dr_grpo would disagree with TRL."""
    logp, old, ref, advantages, mask = logp_inputs(0)
    theirs = trl_loss(trl_trainer("dr_grpo", 0.0), logp, old, advantages, mask, ref)
    wrong = policy_loss(logp, old, advantages, mask, PolicyLossConfig(EPS_LOW, EPS_HIGH, "constant"))
    assert max_abs(wrong, theirs) > 1e-3


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_entropy_bonus_matches_trl(loss_type):
    """The entropy bonus is the token-mean entropy of the batch whatever the loss type, in TRL and here."""
    logp, old, ref, advantages, mask = logp_inputs(0)
    entropy = (2 * torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    entropy.requires_grad_(True)
    theirs = trl_loss(trl_trainer(loss_type, 0.04, entropy_coef=0.01), logp, old, advantages, mask, ref, entropy)
    their_grads = torch.autograd.grad(theirs, (logp, entropy))
    ours = policy_loss(logp, old, advantages, mask, our_cfg(loss_type, 0.04, entropy_coef=0.01), ref_logp=ref,
                       entropy=entropy)
    our_grads = torch.autograd.grad(ours, (logp, entropy))
    assert max_abs(ours, theirs) <= TOL
    for a, b in zip(our_grads, their_grads):
        assert max_abs(a, b) <= TOL


def test_fused_policy_loss_is_float64():
    """Precondition of the fused cross-check: the kernel keeps float64 end to end."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = ragged_mask(g)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    out = fused_policy_loss(hidden, weight, targets, logp.detach(), signed_advantages(g), mask,
                            our_cfg("bnpo", 0.0), backend="torch")
    assert out.loss.dtype == out.logp.dtype == torch.float64
    assert max_abs(out.logp[mask.bool()], logp.detach()[mask.bool()]) <= 1e-12
    out.loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float64


@pytest.mark.parametrize("chunk_tokens", [None, 4])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_policy_loss_matches_trl(loss_type, beta, chunk_tokens):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = ragged_mask(g)
    advantages = signed_advantages(g)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]  # TRL's per-token logps
    old = logp.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    assert_clipping_happened(logp, old, advantages, mask)

    theirs = trl_loss(trl_trainer(loss_type, beta), logp, old, advantages, mask, ref)
    their_grads = torch.autograd.grad(theirs, (hidden, weight))
    out = fused_policy_loss(hidden, weight, targets, old, advantages, mask, our_cfg(loss_type, beta), ref_logp=ref,
                            backend="torch", chunk_tokens=chunk_tokens)
    our_grads = torch.autograd.grad(out.loss, (hidden, weight))

    assert max_abs(out.loss, theirs) <= TOL, (out.loss.item(), theirs.item())
    for ours, their in zip(our_grads, their_grads):
        assert max_abs(ours, their) <= TOL
        assert their.abs().sum() > 0


def test_dapo_micro_batches_match_token_mean_over_generation_batch():
    """TRL's dapo normalises each micro-batch by the token count of the whole generation batch
    (num_items_in_batch); that is our token_mean weights computed over the generation batch and
    applied to the micro-batch's slice, and the micro-batch losses add up to our full-batch loss."""
    g = torch.Generator().manual_seed(3)
    n_micro = 2
    full_mask = torch.cat([ragged_mask(g) for _ in range(n_micro)])  # (2B, T)
    logp = (-3 * torch.rand(n_micro * B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.5 * torch.randn(n_micro * B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(n_micro * B, T, generator=g, dtype=torch.float64)
    advantages = torch.cat([signed_advantages(g) for _ in range(n_micro)])
    cfg = our_cfg("dapo", 0.04)
    weights = aggregation_weights(full_mask, cfg)  # token_mean over the generation batch
    num_items = full_mask.long().sum()

    total = 0.0
    for i in range(n_micro):
        rows = slice(i * B, (i + 1) * B)
        trainer = trl_trainer("dapo", 0.04, grad_accum=n_micro, steps_per_generation=n_micro)
        theirs = trl_loss(trainer, logp[rows], old[rows], advantages[rows], full_mask[rows], ref[rows],
                          num_items_in_batch=num_items)
        terms = policy_token_loss(logp[rows], old[rows], advantages[rows, None], cfg, ref[rows])
        ours = (weights[rows] * terms).sum()
        assert max_abs(ours, theirs) <= TOL
        total = total + theirs
    full = policy_loss(logp, old, advantages, full_mask, cfg, ref_logp=ref)
    assert max_abs(full, total) <= TOL
    assert max_abs(*(torch.autograd.grad(x, logp)[0] for x in (full, total))) <= TOL
