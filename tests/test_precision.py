"""Sampling in another precision than the policy's (rollout.dtype), the train/rollout mismatch, and TIS.

The bfloat16 lean step is not the float32 step rounded: its products are bfloat16, the rest float32. What is
asserted is what holds on any x86-64 CPU: one path run twice is bit for bit the same; the two precisions' next-token
distributions are close (KL bounded, measured); the bfloat16 copy follows the policy's weights at every call."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from stagewise_pl.models.load import render_prompts
from stagewise_pl.rollout import SamplingParams, fast_decode
from stagewise_pl.rollout.hf import HFEngine

PROMPTS = ["1+2", "30-4+5", "7", "12+9-3"]


def _teacher_forced(model, tokenizer, dtype, steps: int = 12):
    """Next-token log-distributions (steps, rows, V) of the lean step in ``dtype`` along fixed tokens."""
    enc = tokenizer(render_prompts(tokenizer, PROMPTS), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(0)
    forced = torch.randint(0, len(tokenizer), (steps, ids.shape[0]), generator=gen)
    with torch.no_grad():
        lean = fast_decode.FastDecoder(model, ids.shape[0], ids.shape[1] + steps, dtype=dtype)
        out = [torch.log_softmax(lean.prefill(ids, mask, positions, 1).float(), -1)]
        position = positions[:, -1]
        for s in range(steps - 1):
            position = position + 1
            out.append(torch.log_softmax(lean.step(forced[s], position).float(), -1))
    return torch.stack(out)


def test_the_bfloat16_step_is_close_to_the_float32_step_and_repeatable(tiny):
    """KL(float32 || bfloat16) of the next-token distributions along the same tokens, every step: small (products
    rounded to bfloat16's 8 bits, everything else float32), nonzero (they are different computations), and the
    bfloat16 step run twice is bit for bit itself."""
    model, tokenizer = tiny
    f32 = _teacher_forced(model, tokenizer, None)
    bf16 = _teacher_forced(model, tokenizer, torch.bfloat16)
    assert torch.equal(bf16, _teacher_forced(model, tokenizer, torch.bfloat16))
    kl = (f32.exp() * (f32 - bf16)).sum(-1)  # (steps, rows)
    assert float(kl.max()) < 1e-3, float(kl.max())
    assert float(kl.max()) > 0.0
    # the float32 step is still the float32 step: no bfloat16 in it
    assert torch.equal(f32, _teacher_forced(model, tokenizer, torch.float32))


def test_a_bfloat16_engine_samples_from_the_weights_as_they_are_at_each_call(tiny):
    """The engine's bfloat16 copies are made at every generate call: after the policy's weights change (an optimizer
    step), its log-probs are those of a fresh engine on the changed policy, not of the old weights."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    prompts = render_prompts(tokenizer, PROMPTS)
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=5, logprobs=True)
    engine = HFEngine(model, tokenizer, dtype=torch.bfloat16)
    before = engine.generate(prompts, sampling)
    assert engine.generate(prompts, sampling).logprobs == before.logprobs  # same weights, same seed: same rollouts
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    after = engine.generate(prompts, sampling)
    fresh = HFEngine(model, tokenizer, dtype=torch.bfloat16).generate(prompts, sampling)
    assert after.completion_ids == fresh.completion_ids and after.logprobs == fresh.logprobs
    assert after.logprobs != before.logprobs
    assert next(model.parameters()).dtype == torch.float32  # the policy itself is untouched


def test_finished_rows_stay_in_the_bfloat16_cache_until_a_quarter_has_finished(tiny):
    """In bfloat16 the cache drops finished rows only once they are a quarter of its rows (until then they are
    computed and never read); in float32 at every finish, as before. The live rows' logits are those of a decoder
    that drops at every finish, up to the last bits of products over another number of rows."""
    model, tokenizer = tiny
    enc = tokenizer(render_prompts(tokenizer, PROMPTS), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    assert fast_decode.FastDecoder(model, 8, ids.shape[1] + 8).compact_share == 0.0  # float32: at every finish
    with torch.no_grad():
        lazy = fast_decode.FastDecoder(model, 8, ids.shape[1] + 8, dtype=torch.bfloat16)
        eager = fast_decode.FastDecoder(model, 8, ids.shape[1] + 8, dtype=torch.bfloat16)
        eager.compact_share = 0.0
        a, b = lazy.prefill(ids, mask, positions, 2), eager.prefill(ids, mask, positions, 2)
        assert torch.equal(a, b)
        rows, position = torch.arange(8), positions[:, -1].repeat_interleave(2)
        tokens = torch.arange(8) % len(tokenizer)
        # rows in the lazy cache after each step: one finished of 8 stays; a second makes a quarter (both leave);
        # two of 6 are more than a quarter
        cached = [8, 8, 8, 6, 4, 4]
        for step, finished in enumerate([[], [0], [], [5], [3, 7], []]):
            keep = torch.tensor([i for i in range(len(rows)) if int(rows[i]) not in finished])
            if finished:
                lazy.select(keep)
                eager.select(keep)
                rows, tokens, position = rows[keep], tokens[keep], position[keep]
            position = position + 1
            a, b = lazy.step(tokens, position), eager.step(tokens, position)
            assert a.shape == b.shape == (len(rows), len(tokenizer))
            assert (a.float() - b.float()).abs().max() <= 0.05 * max(1.0, float(b.float().abs().max()))
            assert eager.keys[0].shape[0] == len(rows) and lazy.keys[0].shape[0] == cached[step]
            tokens = (tokens * 7 + step + 1) % len(tokenizer)
        assert lazy.live is None


def test_a_model_the_lean_step_does_not_cover_samples_from_a_bfloat16_copy(tiny, monkeypatch):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    monkeypatch.setattr(model.config, "use_sliding_window", True, raising=False)
    assert not fast_decode.supports(model)
    engine = HFEngine(model, tokenizer, dtype=torch.bfloat16)
    prompts = render_prompts(tokenizer, PROMPTS[:2])
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=1, logprobs=True)
    engine.generate(prompts, sampling)
    assert engine.shadow is not None and next(engine.shadow.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    engine.generate(prompts, sampling)
    assert torch.equal(engine.shadow.get_output_embeddings().weight,
                       model.get_output_embeddings().weight.to(torch.bfloat16))


def test_rollout_dtype_settings_and_the_auto_decision_recorded_for_a_resume(tiny, tmp_path, monkeypatch):
    from stagewise_pl.rollout import precision

    model, _ = tiny
    assert precision.rollout_dtype("model", model) is None
    assert precision.rollout_dtype("bfloat16", model) is torch.bfloat16
    assert precision.rollout_dtype("float32", model) is torch.float32
    with pytest.raises(ValueError, match="rollout.dtype"):
        precision.rollout_dtype("float16", model)
    monkeypatch.setattr(precision, "product_speedup", lambda *a, **k: 3.0)
    said = []
    assert precision.rollout_dtype("auto", model, tmp_path, log=said.append) is torch.bfloat16
    record = json.loads((tmp_path / precision.RECORD).read_text())
    assert record["dtype"] == "bfloat16" and "3.00x" in record["why"]
    # a resume on a machine that measures otherwise samples as the run began
    monkeypatch.setattr(precision, "product_speedup", lambda *a, **k: 0.8)
    assert precision.rollout_dtype("auto", model, tmp_path, log=said.append) is torch.bfloat16
    assert "as this run decided at its start" in said[-1]
    assert precision.rollout_dtype("auto", model, tmp_path / "other", log=said.append) is torch.float32


def test_tis_weights_each_tokens_policy_gradient_by_the_capped_ratio():
    """fused_policy_loss with tis_cap against a hand-written float64 loss on hand-made tokens: the advantage of each
    token times min(pi_train / pi_rollout, cap), the KL term unweighted; gradients too."""
    from stagewise_pl.kernels import fused_policy_loss
    from stagewise_pl.losses import PolicyLossConfig, policy_loss, rollout_mismatch, tis_weights

    torch.manual_seed(0)
    b, t, h, v = 3, 5, 8, 11
    hidden = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[2, 3:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    ref = torch.randn(b, t, dtype=torch.float64) * 0.1 - 2.0
    cfg = PolicyLossConfig(beta=0.1)
    logp_now = torch.log_softmax(hidden.detach() @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    rollout = logp_now + torch.tensor([[0.0, 0.3, -0.3, 2.0, -2.0]] * b, dtype=torch.float64)  # engine's view
    cap = 2.0

    out = fused_policy_loss(hidden, weight, targets, None, adv, mask, cfg, ref_logp=ref, rollout_logp=rollout,
                            tis_cap=cap, backend="torch")
    out.loss.backward()
    grad = hidden.grad.clone()

    hidden2 = hidden.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(hidden2 @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    w = torch.minimum(torch.exp(logp.detach() - rollout), torch.tensor(cap, dtype=torch.float64))
    ratio = torch.exp(logp - logp.detach())
    a = adv[:, None] * w
    pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    d = ref - logp
    token = pg + 0.1 * (torch.exp(d) - d - 1)
    expected = (token * mask).sum() / mask.sum()
    expected.backward()
    assert torch.allclose(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, hidden2.grad, rtol=1e-9, atol=1e-12)
    # per offset of the engine's log-prob: exp(-offset), and the cap where that is above it
    expect = torch.tensor([1.0, math.exp(-0.3), math.exp(0.3), math.exp(-2.0), cap], dtype=torch.float64)
    assert torch.allclose(w, expect.expand(b, t), rtol=1e-12)
    assert torch.equal(tis_weights(logp_now, rollout, cap), w)
    # the reference loss from per-token log-probs (what the fused kernel is checked against elsewhere) agrees
    assert torch.allclose(policy_loss(logp.detach(), logp.detach(), adv, mask, cfg, ref_logp=ref, rollout_logp=rollout,
                                      tis_cap=cap), out.loss.detach(), rtol=1e-10, atol=1e-12)
    # the weights matter: without TIS the same call gives another loss
    plain = fused_policy_loss(hidden.detach(), weight, targets, None, adv, mask, cfg, ref_logp=ref, backend="torch")
    assert not torch.allclose(plain.loss, out.loss)
    with pytest.raises(ValueError, match="tis_cap"):
        fused_policy_loss(hidden.detach(), weight, targets, None, adv, mask, cfg, ref_logp=ref, tis_cap=2.0)

    gap = rollout_mismatch(logp_now, rollout, mask)
    assert gap["tokens"] == 13 and gap["max_gap"] == pytest.approx(2.0)
    dd = (logp_now - rollout)[mask.bool()]
    assert gap["kl"] == pytest.approx(float((torch.exp(dd) - dd - 1).mean()))
    assert rollout_mismatch(logp_now, logp_now, mask)["kl"] == 0.0


@pytest.mark.slow
def test_every_kind_trains_in_bf16_mixed_with_bfloat16_rollouts_and_a_resume_is_exact(tmp_path, base_overrides):
    """trainer.precision=bf16-mixed and rollout.dtype=bfloat16 through every training kind (sft, bridge_sft, grpo
    with TIS, cft, hpt, relift) on the real tiny base: each phase trains with finite losses, the GRPO phase logs the
    train/rollout mismatch, and a run killed mid-plan and resumed ends bit for bit where the uninterrupted one does
    (the same-seed promise within a precision setting)."""
    from helpers import fit, outcome, resume

    plan = ("phases=[{name: s, kind: sft, steps: 3, lr: 5e-4}, {name: p, kind: profile, limit: 40}, "
            "{name: b, kind: bridge_sft, select: hard, steps: 2, lr: 5e-4}, "
            "{name: g, kind: grpo, select: medium, steps: 3, lr: 1e-4}, "
            "{name: c, kind: cft, select: unsolved_in_rl, steps: 2, lr: 1e-4}, "
            "{name: h, kind: hpt, steps: 2, lr: 1e-4}, {name: r, kind: relift, steps: 2, lr: 1e-4}]")
    args = [*base_overrides, plan, "profile.k=4", "grpo.prompts_per_step=4", "grpo.num_generations=4",
            "grpo.max_new_tokens=24", "trainer.batch_size=16", "bridge.samples=2", "mixed.buffer_size=3",
            "trainer.checkpoint_every_n_steps=2", "eval.each_phase=false", "run.deterministic=true",
            "trainer.precision=bf16-mixed", "rollout.dtype=bfloat16", "grpo.tis_cap=2.0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    out = fit([*args, f"run.dir={whole}"])
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads((whole / "state.json").read_text())["completed"]
    kinds = {s["kind"]: s for s in done.values()}
    assert set(kinds) >= {"sft", "profile", "bridge_sft", "grpo", "cft", "hpt", "relift"}
    for name, s in done.items():
        assert not s.get("nonfinite_skipped"), (name, s)
    assert kinds["grpo"]["optimizer_steps"] > 0
    assert 0.0 <= kinds["grpo"]["rollout_kl"] < 0.05 and kinds["grpo"]["rollout_max_gap"] > 0.0, kinds["grpo"]
    out = fit([*args, f"run.dir={killed}"], {"STAGEWISE_FAULT": "decode#60"})  # SIGKILL mid rollout
    assert out.returncode == -9, out.stderr[-3000:]
    out = resume([*args], killed)
    assert out.returncode == 0, out.stderr[-3000:]
    assert outcome(killed) == outcome(whole)


def test_the_engine_samples_in_its_own_precision_inside_an_autocast_region(tiny):
    """Under trainer.precision=bf16-mixed a phase's step runs in a bfloat16 autocast region; the engine's rollouts
    there are bit for bit those it samples outside it (float32 and bfloat16 engines alike)."""
    model, tokenizer = tiny
    prompts = render_prompts(tokenizer, PROMPTS)
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3, logprobs=True)
    for dtype in (None, torch.bfloat16):
        plain = HFEngine(model, tokenizer, dtype=dtype).generate(prompts, sampling)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = HFEngine(model, tokenizer, dtype=dtype).generate(prompts, sampling)
        assert inside.completion_ids == plain.completion_ids and inside.logprobs == plain.logprobs
