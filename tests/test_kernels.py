"""Fused log-prob kernels against a float64 naive reference: values, gradients, odd shapes, both backends."""
import pytest
import torch

from stagewise_pl.kernels import fused_nll_loss, fused_policy_loss, logprobs, resolve_backend
from stagewise_pl.losses import AGGREGATIONS, PolicyLossConfig, policy_loss

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not __import__("stagewise_pl.kernels", fromlist=["x"]).triton_available(), reason="triton is not installed"))]
FP32_TOL = 1e-5
# (N tokens, H, V prime or odd, chunk_tokens, vocab_block): N not a multiple of the chunk, N = 1, vocab blocks
SHAPES = [(1, 8, 13, None, None), (37, 16, 101, 8, None), (37, 16, 101, 8, 13), (64, 12, 97, 64, 32)]


def inputs(n, h, v, seed=0, dtype=torch.float32, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    bias = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 3:
        targets[2] = -100
    return hidden, weight, bias, targets


def naive(hidden, weight, bias, targets, temperature):
    """float64: logits, log_softmax, gather; entropy of the softmax; 0 on ignored rows."""
    z = (hidden.double() @ weight.double().T + bias.double()) / temperature
    logsm = torch.log_softmax(z, -1)
    valid = targets != -100
    logp = torch.where(valid, logsm.gather(-1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    entropy = torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0)
    return logp, entropy


def grads(out, params):
    return torch.autograd.grad(out, params, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,chunk,block", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_float64(backend, n, h, v, chunk, block, temperature):
    hidden, weight, bias, targets = inputs(n, h, v)
    logp, entropy = logprobs(hidden, weight, targets, bias, temperature, with_entropy=True, backend=backend,
                             chunk_tokens=chunk, vocab_block=block)
    ref_logp, ref_entropy = naive(hidden, weight, bias, targets, temperature)
    assert (logp.double() - ref_logp).abs().max() <= FP32_TOL
    assert (entropy.double() - ref_entropy).abs().max() <= FP32_TOL
    # gradients of a mix of both outputs, to hidden, weight and bias
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ours = grads((a * logp).sum() + (b * entropy).sum(), (hidden, weight, bias))
    ref = grads((a.double() * ref_logp).sum() + (b.double() * ref_entropy).sum(), (hidden, weight, bias))
    for mine, theirs in zip(ours, ref):
        assert (mine.double() - theirs.double()).abs().max() <= FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_no_gradient(backend):
    hidden, weight, bias, targets = inputs(9, 8, 31)
    targets[[0, 4, 8]] = -100
    logp, entropy = logprobs(hidden, weight, targets, bias, with_entropy=True, backend=backend, chunk_tokens=4)
    assert torch.all(logp[[0, 4, 8]] == 0) and torch.all(entropy[[0, 4, 8]] == 0)
    (grad_hidden,) = grads(logp.sum() + entropy.sum(), (hidden,))
    assert torch.all(grad_hidden[[0, 4, 8]] == 0) and torch.all(grad_hidden[[1, 3, 5]].abs().sum(-1) > 0)


def test_gradcheck_float64():
    hidden, weight, bias, targets = inputs(7, 5, 11, dtype=torch.float64)
    for block in (None, 4):
        assert torch.autograd.gradcheck(lambda h, w, b: logprobs(h, w, targets, b, 0.8, with_entropy=True,
                                                                 chunk_tokens=3, vocab_block=block),
                                        (hidden, weight, bias))
        assert torch.autograd.gradcheck(lambda h, w, b: fused_nll_loss(h, w, targets, b, chunk_tokens=3,
                                                                       vocab_block=block)[0], (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [None, 13])
def test_fused_nll_matches_cross_entropy(backend, block):
    hidden, weight, bias, targets = inputs(37, 16, 101)
    loss, count = fused_nll_loss(hidden, weight, targets, bias, backend=backend, chunk_tokens=8, vocab_block=block)
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T + bias.double(), targets,
                                            ignore_index=-100)
    assert count == 36 and abs(loss.item() - ref.item()) <= FP32_TOL
    for mine, theirs in zip(grads(loss, (hidden, weight, bias)), grads(ref, (hidden, weight, bias))):
        assert (mine.double() - theirs).abs().max() <= FP32_TOL


def policy_inputs(seed=0, b=3, t=9, h=16, v=101, dtype=torch.float32):
    hidden, weight, bias, _ = inputs(b * t, h, v, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = hidden.detach().view(b, t, h).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 6:], mask[2, :2] = 0, 0
    with torch.no_grad():  # old and reference log-probs near the current ones, as after one update
        current = naive(hidden.reshape(-1, h), weight, torch.zeros(v), targets.reshape(-1), 1.0)[0].view(b, t)
    old = current + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = current + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    advantages = torch.randn(b, generator=g, dtype=torch.float64)
    return hidden, weight, targets, mask, old, ref, advantages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
@pytest.mark.parametrize("beta,entropy_coef,block", [(0.0, 0.0, None), (0.04, 0.01, None), (0.04, 0.01, 13)])
def test_fused_policy_loss_matches_reference(backend, aggregation, beta, entropy_coef, block):
    hidden, weight, targets, mask, old, ref, advantages = policy_inputs()
    cfg = PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.28, aggregation=aggregation, beta=beta,
                           entropy_coef=entropy_coef)
    out = fused_policy_loss(hidden, weight, targets, old.float(), advantages.float(), mask.float(), cfg,
                            ref_logp=ref.float(), backend=backend, chunk_tokens=5, vocab_block=block)
    logp, entropy = naive(hidden.reshape(-1, hidden.shape[-1]), weight, torch.zeros(weight.shape[0]),
                          targets.reshape(-1), 1.0)
    ref_loss = policy_loss(logp.view(targets.shape), old, advantages, mask, cfg, ref_logp=ref,
                           entropy=entropy.view(targets.shape))
    assert abs(out.loss.item() - ref_loss.item()) <= FP32_TOL
    for mine, theirs in zip(grads(out.loss, (hidden, weight)), grads(ref_loss, (hidden, weight))):
        assert (mine.double() - theirs).abs().max() <= FP32_TOL
    assert 0 < out.clip_fraction < 1  # some ratios were clipped, some not: both branches are exercised


def test_fused_policy_loss_float64_is_exact():
    hidden, weight, targets, mask, old, ref, advantages = policy_inputs(dtype=torch.float64)
    cfg = PolicyLossConfig(beta=0.04, entropy_coef=0.01, aggregation="seq_mean_token_mean")
    out = fused_policy_loss(hidden, weight, targets, old, advantages, mask, cfg, ref_logp=ref, chunk_tokens=4)
    logp, entropy = naive(hidden.reshape(-1, hidden.shape[-1]), weight,
                          torch.zeros(weight.shape[0], dtype=torch.float64), targets.reshape(-1), 1.0)
    ref_loss = policy_loss(logp.view(targets.shape), old, advantages, mask, cfg, ref, entropy.view(targets.shape))
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-12
    assert torch.allclose(grads(out.loss, (hidden,))[0], grads(ref_loss, (hidden,))[0], atol=1e-12)
    assert torch.autograd.gradcheck(lambda h: fused_policy_loss(h, weight, targets, old, advantages, mask, cfg,
                                                                ref_logp=ref, chunk_tokens=4).loss, (hidden,))


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 in, float32 inside: the error is bf16's rounding of the outputs (2^-8 relative), not of the sums."""
    hidden, weight, bias, targets = inputs(37, 16, 101, dtype=torch.bfloat16)
    logp, entropy = logprobs(hidden, weight, targets, bias, with_entropy=True, chunk_tokens=8)
    assert logp.dtype == torch.bfloat16
    ref_logp, ref_entropy = naive(hidden, weight, bias, targets, 1.0)  # float64 on the same bf16 values
    assert torch.all((logp.double() - ref_logp).abs() <= 2 ** -8 * ref_logp.abs() + 1e-5)
    assert torch.all((entropy.double() - ref_entropy).abs() <= 2 ** -8 * ref_entropy.abs() + 1e-5)
    (grad_hidden,) = grads(logp.float().sum(), (hidden,))
    (ref_grad,) = grads(ref_logp.sum(), (hidden,))
    assert grad_hidden.dtype == torch.bfloat16
    assert torch.all((grad_hidden.double() - ref_grad.double()).abs() <= 2 ** -7 * ref_grad.double().abs() + 1e-3)


def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda-magic", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, ImportError), match="triton"):
        resolve_backend("triton", cpu)


@pytest.mark.skipif(not __import__("stagewise_pl.kernels", fromlist=["x"]).triton_available(),
                    reason="triton is not installed")
def test_triton_self_test_passes_and_catches_a_broken_kernel(monkeypatch):
    """auto mode runs this once per CUDA device before trusting Triton; here on CPU under the interpreter."""
    from stagewise_pl import kernels
    from stagewise_pl.kernels import triton_rows

    assert kernels.triton_self_test(torch.device("cpu"))
    kernels._SELF_TESTS.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("does not compile")

    monkeypatch.setattr(triton_rows.TritonRowOps, "stats", staticmethod(broken))
    with pytest.warns(UserWarning, match="self-test"):
        assert not kernels.triton_self_test(torch.device("cpu"))
    kernels._SELF_TESTS.clear()


def test_sft_never_builds_full_logits(tiny_model_dir):
    """The SFT loss goes through the kernel: the LM head's own forward is never called."""
    from transformers import AutoModelForCausalLM

    from stagewise_pl.data.sft import Example, pad_collate
    from stagewise_pl.models.forward import sft_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = model.get_output_embeddings()

    def refuse(*args, **kwargs):
        raise AssertionError("full logits were computed")

    head.forward = refuse
    batch = pad_collate([Example([5, 6, 7, 8], [-100, -100, 7, 8])], pad_id=0)
    loss, count = sft_loss(model, batch)
    loss.backward()
    assert count == 2 and torch.isfinite(loss) and head.weight.grad is not None


def test_rows_with_ignored_targets_never_reach_the_kernels(monkeypatch):
    """The head's products run on the counted rows only (an SFT batch's prompt and padding cost nothing), and the
    results are the naive reference's: 0 and no gradient on the ignored rows."""
    import stagewise_pl.kernels as kernels

    rows_seen = []
    for name in ("LinearLogProb", "FusedTokenLoss"):
        function = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, type(name, (), {"apply": staticmethod(
            lambda x, *args, _apply=function.apply: rows_seen.append(x.shape[0]) or _apply(x, *args))}))
    hidden, weight, bias, targets = inputs(12, 8, 11, dtype=torch.float64)
    targets[:4], targets[9] = -100, -100  # 7 of 12 rows count
    logp, entropy = logprobs(hidden, weight, targets, bias, with_entropy=True)
    ref_logp, ref_entropy = naive(hidden, weight, bias, targets, 1.0)
    assert torch.allclose(logp, ref_logp) and torch.allclose(entropy, ref_entropy)
    assert not entropy[targets == -100].any()
    loss, count = fused_nll_loss(hidden, weight, targets, bias)
    loss.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    (-ref_logp.sum() / 7).backward()
    assert int(count) == 7 and torch.allclose(grad, hidden.grad) and not grad[targets == -100].any()
    mask = (targets != -100).double()
    advantages = torch.linspace(-1, 1, 12, dtype=torch.float64)
    out = fused_policy_loss(hidden, weight, targets.clamp(min=0), None, advantages, mask, PolicyLossConfig(),
                            bias=bias)
    ref = policy_loss(ref_logp, ref_logp.detach(), advantages, mask, PolicyLossConfig())
    assert torch.allclose(out.loss, ref)
    assert rows_seen == [7, 7, 7]
