"""The device-aware chunk plan (a pure function, checked here for CUDA shapes without a GPU) and the
low-precision matrix-product path it chooses on CUDA, run on CPU against float64: both row-op backends
(Triton under its interpreter), bf16 and fp16 inputs, whole-vocabulary chunks of the plan's shape."""
import pytest
import torch

from stagewise_pl.kernels import Plan, choose_plan, device_plan, fused_nll_loss, fused_policy_loss, logprobs
from stagewise_pl.kernels.plan import (CUDA_CHUNK_ALIGN, MEMORY_GOAL_FRACTION, naive_extra_bytes, plan,
                                                 plan_extra_bytes)
from stagewise_pl.losses import PolicyLossConfig, policy_loss

from test_kernels import BACKENDS, grads, inputs, naive

QWEN = dict(hidden=1536, vocab=151936)  # Qwen2.5-1.5B's shapes, the GPU recipe's
GIB = 2**30


def test_the_cpu_plan_is_the_one_the_cpu_benchmarks_chose():
    for dtype in (torch.float32, torch.bfloat16):
        for single_pass in (True, False):
            assert device_plan("cpu", dtype, 4096, 576, 49152, None, single_pass) == plan(
                4096, 49152, 576, dtype, single_pass=single_pass)
    assert device_plan("cpu", torch.bfloat16, 4096, 576, 49152).matmul_dtype is None  # products upcast


@pytest.mark.parametrize("n", [4096, 16384])
def test_the_cuda_plan_takes_the_whole_vocabulary_in_tensor_core_products_and_the_fewest_chunks(n):
    p = device_plan("cuda", torch.bfloat16, n, QWEN["hidden"], QWEN["vocab"], free_bytes=140 * GIB)
    assert p.vocab_block == QWEN["vocab"] and p.matmul_dtype == torch.bfloat16
    assert p.chunk_tokens % CUDA_CHUNK_ALIGN == 0
    goal = naive_extra_bytes(n, QWEN["vocab"], torch.bfloat16) * MEMORY_GOAL_FRACTION
    used = plan_extra_bytes(p, n, QWEN["hidden"], QWEN["vocab"], torch.bfloat16)
    bigger = Plan(p.chunk_tokens + CUDA_CHUNK_ALIGN, p.vocab_block, p.matmul_dtype, p.grad_w_dtype)
    assert used <= goal < plan_extra_bytes(bigger, n, QWEN["hidden"], QWEN["vocab"], torch.bfloat16)
    float32_grad_w = Plan(CUDA_CHUNK_ALIGN, QWEN["vocab"], torch.bfloat16)
    if n == 4096:  # the float32 weight gradient and its bf16 copy (1.3 GiB) leave no room within one eighth of
        # a small N's naive memory: accumulated in bf16 (0.43 GiB, no copy), one aligned chunk fits
        assert p.grad_w_dtype == torch.bfloat16 and p.chunk_tokens == CUDA_CHUNK_ALIGN
        assert plan_extra_bytes(float32_grad_w, n, QWEN["hidden"], QWEN["vocab"], torch.bfloat16) > goal
    else:  # float32 accumulation fits: kept; a few large products, not hundreds of small ones
        assert p.grad_w_dtype is None and p.chunk_tokens >= 1024


def test_the_cuda_plan_follows_free_memory_dtype_and_small_batches():
    tight = device_plan("cuda", torch.bfloat16, 16384, QWEN["hidden"], QWEN["vocab"], free_bytes=6 * GIB)
    roomy = device_plan("cuda", torch.bfloat16, 16384, QWEN["hidden"], QWEN["vocab"], free_bytes=140 * GIB)
    assert CUDA_CHUNK_ALIGN <= tight.chunk_tokens < roomy.chunk_tokens
    assert plan_extra_bytes(tight, 16384, QWEN["hidden"], QWEN["vocab"], torch.bfloat16) <= 3 * GIB
    assert device_plan("cuda", torch.float16, 8192, 896, 151936).matmul_dtype == torch.float16
    assert device_plan("cuda", torch.float32, 8192, 896, 151936).matmul_dtype is None  # no low-precision copy
    assert device_plan("cuda", torch.bfloat16, 100, 896, 151936).chunk_tokens == 100  # N below one aligned chunk


def test_a_bfloat16_weight_gradient_only_with_bfloat16_products():
    assert device_plan("cuda", torch.float16, 4096, QWEN["hidden"], QWEN["vocab"]).grad_w_dtype is None
    assert device_plan("cuda", torch.float32, 4096, QWEN["hidden"], QWEN["vocab"]).grad_w_dtype is None
    for matmul, grad_w in [(torch.float16, torch.float16), (None, torch.bfloat16), (torch.float16, torch.bfloat16)]:
        with pytest.raises(ValueError, match="needs bfloat16 products"):
            Plan(256, 1031, matmul, grad_w)


def test_a_call_gets_the_devices_plan_unless_it_names_sizes():
    hidden, weight = torch.zeros(3, 5, 8), torch.zeros(101, 8)
    assert choose_plan(hidden, weight) == device_plan("cpu", torch.float32, 15, 8, 101)
    assert choose_plan(hidden, weight, chunk_tokens=4) == plan(15, 101, 8, torch.float32, chunk_tokens=4)


# ------------------------------------------------------------------ the low-precision products, on CPU
LOW = [torch.bfloat16, torch.float16]
ROUND = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}  # relative rounding of one value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_products_match_float64_at_a_whole_vocabulary_chunk(backend, dtype, temperature=0.7):
    """N=150 in chunks of 128 (one full, one partial), V=1031 in one block (a row walks two of Triton's 1024-wide
    tiles): the CUDA plan's shape, scaled down for the interpreter.
    Products of bf16/fp16 values are exact in float32, so log-probs and entropies carry float32 error only; the
    gradients go through the logits' gradient rounded to the input dtype once (the tensor-core products)."""
    hidden, weight, bias, targets = inputs(150, 64, 1031, dtype=dtype, scale=0.3)
    chunk_plan = Plan(128, 1031, dtype)
    logp, entropy = logprobs(hidden, weight, targets, bias, temperature, with_entropy=True, backend=backend,
                             chunk_plan=chunk_plan)
    assert logp.dtype == dtype
    ref_logp, ref_entropy = naive(hidden, weight, bias, targets, temperature)  # float64 on the same values
    # before the outputs' own rounding to the input dtype: float32 error only (the logits were never rounded)
    assert torch.all((logp.double() - ref_logp).abs() <= ROUND[dtype] * ref_logp.abs())
    assert torch.all((entropy.double() - ref_entropy).abs() <= ROUND[dtype] * ref_entropy.abs())
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(150, generator=g), torch.randn(150, generator=g)
    ours = grads((a * logp.float()).sum() + (b * entropy.float()).sum(), (hidden, weight, bias))
    ref = grads((a.double() * ref_logp).sum() + (b.double() * ref_entropy).sum(), (hidden, weight, bias))
    for mine, theirs in zip(ours, ref):
        assert mine.dtype == dtype
        err = (mine.double() - theirs.double()).abs().max() / theirs.double().abs().max()
        assert err <= 4 * ROUND[dtype], f"{err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_fused_losses_in_low_precision_products_match_float64(backend, dtype):
    hidden, weight, bias, targets = inputs(150, 64, 1031, dtype=dtype, scale=0.3)
    loss, count = fused_nll_loss(hidden, weight, targets, bias, backend=backend, chunk_plan=Plan(128, 1031, dtype))
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T + bias.double(), targets,
                                            ignore_index=-100)
    assert count == 149 and abs(loss.item() - ref.item()) <= 1e-5 * ref.abs().item()  # logits never rounded
    for mine, theirs in zip(grads(loss, (hidden, weight, bias)), grads(ref, (hidden, weight, bias))):
        err = (mine.double() - theirs.double()).abs().max() / theirs.double().abs().max()
        assert err <= 4 * ROUND[dtype], f"{err:.2e}"
    # the GRPO surrogate (clipped ratios, KL to a reference, entropy bonus) through the same products
    b, t = 2, 75
    h3 = hidden.detach()[: b * t].view(b, t, -1).requires_grad_(True)
    tg = targets[: b * t].clamp(min=0).view(b, t)
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(b, t, generator=g) > 0.1).double()
    with torch.no_grad():
        current = naive(h3.reshape(b * t, -1), weight, torch.zeros(1031), tg.reshape(-1), 1.0)[0].view(b, t)
    old, ref_lp = current + 0.3 * torch.randn(b, t, generator=g), current + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    cfg = PolicyLossConfig(beta=0.04, entropy_coef=0.01)
    out = fused_policy_loss(h3, weight, tg, old.float(), adv.float(), mask.float(), cfg, ref_logp=ref_lp.float(),
                            backend=backend, chunk_plan=Plan(128, 1031, dtype))
    lp, ent = naive(h3.reshape(b * t, -1), weight, torch.zeros(1031), tg.reshape(-1), 1.0)
    want = policy_loss(lp.view(b, t), old, adv, mask, cfg, ref_logp=ref_lp, entropy=ent.view(b, t))
    assert abs(out.loss.item() - want.item()) <= 1e-3 * max(1.0, abs(want.item()))
    (mine,), (theirs,) = grads(out.loss, (h3,)), grads(want, (h3,))
    assert (mine.double() - theirs).abs().max() / theirs.abs().max() <= 4 * ROUND[dtype]


def test_the_cuda_benchmark_runs_every_row_in_a_smoke_run_on_cpu(tmp_path, capsys):
    """tools/gpu_check.sh runs it on a lent GPU, once: a bug there costs the GPU session, so it runs here first."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / "bench_cuda_logprob.py"
    spec = importlib.util.spec_from_file_location("bench_cuda_logprob", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--tokens", "40", "--hidden", "16", "--vocab", "101", "--repeats", "1",
                       "--json", str(tmp_path / "rows.json")])
    labels = {r["variant"] for r in rows}
    assert not [r for r in rows if "error" in r] and len(rows) >= 6
    assert {"SFT naive (logits, cross_entropy)", "GRPO ours, Triton row ops", "GRPO ours, torch row ops"} <= labels
    assert "plan 40 tokens x 101 vocabulary rows" in capsys.readouterr().out


@pytest.mark.parametrize("prompts,completions", [(4, 8), (3, 2)])
def test_the_packed_attention_measurement_computes_the_dense_attention(prompts, completions):
    """docs/PERFORMANCE.md quotes tools/bench_packed_attention.py's split beside the dense block mask: its
    figures only mean something if both compute the same attention and gradients (float64, padding rows out)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "tools" / "bench_packed_attention.py"
    spec = importlib.util.spec_from_file_location("bench_packed_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seg, plen = bench.packed_rows(prompts, completions, seed=prompts)
    fs, inputs, grad, _ = bench.variants(seg, plen, 4, 2, 8, torch.float64)
    real = (seg >= 0)[:, None, :, None]
    want, got = fs["dense"](), fs["split"]()
    assert (got - want).mul(real).abs().max() < 1e-12 and want.mul(real).abs().max() > 0.1
    for a, b in zip(torch.autograd.grad(want, inputs, grad), torch.autograd.grad(got, inputs, grad)):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_products_keep_small_gradients(backend):
    """A GRPO step's token weights are 1 / (tokens in the batch): at thousands of tokens a logit's gradient lies
    below float16's smallest normal number (6e-5), where rounding it for the tensor-core products would lose its
    precision or flush it to zero. The chunk is scaled by a power of two before its rounding (and the products
    divide it out), so the gradients keep float16's relative precision."""
    hidden, weight, _, targets = inputs(150, 64, 1031, dtype=torch.float16, scale=0.3)
    h3, tg = hidden.detach().view(2, 75, 64).requires_grad_(True), targets.clamp(min=0).view(2, 75)
    mask, adv = torch.ones(2, 75), torch.tensor([1.0, -0.5])
    tiny = torch.full((2, 75), 1e-6)  # the weights of a batch of a million tokens
    out = fused_policy_loss(h3, weight, tg, None, adv, mask, PolicyLossConfig(), weights=tiny, backend=backend,
                            chunk_plan=Plan(128, 1031, torch.float16))
    h64, w64 = h3.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    logp = torch.log_softmax(h64 @ w64.T, -1).gather(-1, tg[..., None])[..., 0]
    ref = -(1e-6 * adv.double()[:, None] * logp).sum()  # on-policy: the surrogate's gradient is -w * A * grad logp
    # float16 training scales the loss (Lightning's GradScaler, 2^16) so that the returned gradients are normal
    # numbers; the kernel computes its gradients in the forward pass, before that factor reaches it
    scaled = 2.0 ** 16
    for mine, theirs in zip(grads(out.loss * scaled, (h3, weight)), grads(ref * scaled, (h64, w64))):
        err = (mine.double() - theirs).abs().max() / theirs.abs().max()
        assert err <= 4 * ROUND[torch.float16], f"{err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [128, 16])
def test_a_bfloat16_weight_gradient_rounds_once_per_chunk(backend, chunk):
    """Plan.grad_w_dtype=bfloat16: the weight gradient is a bfloat16 sum of each chunk's float32 product, so its
    error against float64 grows with the number of chunks k (one rounding of the running sum per chunk) but stays
    within (2 + k/2) roundings of the largest entry; hidden's gradient and the log-probs are unchanged."""
    hidden, weight, bias, targets = inputs(150, 64, 1031, dtype=torch.bfloat16, scale=0.3)
    chunks = -(-150 // chunk)
    kept = Plan(chunk, 1031, torch.bfloat16)
    low = Plan(chunk, 1031, torch.bfloat16, torch.bfloat16)
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T + bias.double(), targets,
                                            ignore_index=-100)
    ref_h, ref_w = grads(ref, (hidden, weight))
    for loss_of in (lambda p: fused_nll_loss(hidden, weight, targets, bias, backend=backend, chunk_plan=p)[0],
                    lambda p: -logprobs(hidden, weight, targets, bias, backend=backend, chunk_plan=p)[0].float(
                        ).sum() / 149):
        (h32, w32), (h16, w16) = grads(loss_of(kept), (hidden, weight)), grads(loss_of(low), (hidden, weight))
        assert w16.dtype == torch.bfloat16 and torch.equal(h16, h32)
        assert not torch.equal(w16, w32)  # the sum was rounded on the way (float32 accumulation rounds only at the end)
        err = (w16.double() - ref_w).abs().max() / ref_w.abs().max()
        assert err <= (2 + chunks / 2) * ROUND[torch.bfloat16], f"{err:.2e}"
        assert (h16.double() - ref_h).abs().max() / ref_h.abs().max() <= 4 * ROUND[torch.bfloat16]
