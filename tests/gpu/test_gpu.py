"""What only a GPU can check (marker gpu; tools/gpu_check.sh runs it on a CUDA machine): the Triton kernels
against a float64 reference on CUDA, a bf16 SFT and GRPO step of a tiny model with sdpa, VLLMEngine where
vllm imports. Deselected on CPU machines, where it cannot run."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device: these checks need a GPU (run tools/gpu_check.sh on one)")


@pytest.mark.parametrize("n,h,v", [(1, 64, 101), (515, 256, 32003), (4096, 896, 151936)])
def test_triton_kernels_match_float64_on_cuda(n, h, v):
    from stagewise_pl.kernels import fused_nll_loss, logprobs, triton_self_test

    assert triton_self_test(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 0.5).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.05).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    logp, entropy = logprobs(hidden, weight, targets, with_entropy=True, backend="triton")
    ref = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    ref_logp = ref.gather(-1, targets[:, None])[:, 0]
    assert (logp.double() - ref_logp).abs().max() < 1e-3
    assert (entropy.double() - (-(ref.exp() * ref).sum(-1))).abs().max() < 1e-3
    loss, _ = fused_nll_loss(hidden, weight, targets, backend="triton")
    loss.backward()
    (-ref_logp.mean()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_device_plan_in_low_precision_products_matches_float64_on_cuda(backend, dtype):
    """The default plan on CUDA (whole-vocabulary chunks, products in the input dtype with float32 accumulation)
    at Qwen2.5's vocabulary: the SFT loss and its gradients against float64 on the same rounded inputs, with a third
    of the targets ignored (prompt tokens: the kernels compute the counted rows only, and give the others no
    gradient)."""
    from stagewise_pl.kernels import choose_plan, fused_nll_loss

    n, h, v = 4096, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g) * 0.3).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::3] = -100
    chunk_plan = choose_plan(hidden, weight)
    assert chunk_plan.matmul_dtype == dtype and chunk_plan.vocab_block == v
    loss, count = fused_nll_loss(hidden, weight, targets, backend=backend)
    assert int(count) == n - len(range(0, n, 3))
    ref = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T, targets)
    assert abs(loss.item() - ref.item()) <= 1e-4 * ref.item()
    mine = torch.autograd.grad(loss, (hidden, weight))
    theirs = torch.autograd.grad(ref, (hidden, weight))
    # a bf16 weight gradient (the plan's grad_w_dtype at this N) is rounded once per chunk: (2 + k/2) roundings
    chunks = -(-n // chunk_plan.chunk_tokens)
    bounds = [2 ** -6, max(2 ** -6, (2 + chunks / 2) * 2 ** -8) if chunk_plan.grad_w_dtype else 2 ** -6]
    for a, b, bound in zip(mine, theirs, bounds):
        assert a.dtype == dtype
        assert (a.double() - b).abs().max() / b.abs().max() <= bound
    assert not mine[0][::3].any()  # an ignored row's hidden state gets no gradient


def test_bf16_sft_and_grpo_steps_of_a_tiny_model(tmp_path):
    import dataclasses

    from stagewise_pl.config import Config, TinyModelConfig
    from stagewise_pl.data.examples import build_examples
    from stagewise_pl.data.problems import Problem
    from stagewise_pl.data.sft import pack_collate
    from stagewise_pl.models.forward import sft_loss
    from stagewise_pl.models.load import load_policy
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.phases import GRPORunner, PhaseContext, RolloutEngines
    from stagewise_pl.phases.driver import fit_phase
    from stagewise_pl.plan import PhaseSpec
    from stagewise_pl.routing.selection import Selection
    from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level
    from stagewise_pl.verify import make_verifier

    task = ArithmeticTask([Level(2, 9)], train_per_level=32, test_per_level=2)
    directory = save_random_tiny(tmp_path / "m", TinyModelConfig(), task)
    policy, tok = load_policy(str(directory), "bfloat16", "sdpa")
    policy.cuda()
    batch = {k: v.cuda() for k, v in pack_collate(build_examples(tok, task.split("train")[:16], "teacher_trace", 128),
                                                   tok.pad_token_id, 128).items()}
    loss, count = sft_loss(policy, batch, "auto")
    loss.backward()
    policy.zero_grad()
    assert torch.isfinite(loss) and count > 0
    problems = [Problem(id=p.id, prompt=p.prompt, answer=p.answer, source="t") for p in task.split("train")[:8]]
    cfg = Config()
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, prompts_per_step=4, num_generations=4,
                                                            max_new_tokens=24, max_rollout_factor=2),
                              trainer=dataclasses.replace(cfg.trainer, accelerator="gpu", precision="bf16-true"),
                              run=dataclasses.replace(cfg.run, progress_bar=False))
    spec = PhaseSpec(1, "grpo", "grpo", steps=1, lr=1e-4)
    with make_verifier(cfg) as verifier:
        ctx = PhaseContext(cfg, policy, tok, plan=[spec], traits={"grpo": GRPORunner.traits}, verifier=verifier,
                           engines=RolloutEngines(cfg, policy, tok, lambda: str(directory), []), task=task)
        runner = fit_phase(GRPORunner(ctx, spec, Selection("grpo", "grpo", "all", problems)))
    assert 1 <= runner.position <= 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed on this GPU machine")
def test_vllm_engine_on_gpu(tmp_path):
    from stagewise_pl.config import TinyModelConfig
    from stagewise_pl.models.load import load_policy, render_prompts
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.rollout import SamplingParams
    from stagewise_pl.rollout.vllm_engine import VLLMEngine
    from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level

    directory = save_random_tiny(tmp_path / "m", TinyModelConfig(), ArithmeticTask([Level(1, 9)], train_per_level=20,
                                                                                   test_per_level=2))
    model, tok = load_policy(str(directory))
    engine = VLLMEngine(str(directory), dtype="float32", max_model_len=256, gpu_memory_utilization=0.2)
    batch = engine.generate(render_prompts(tok, ["1+2", "3+4"]), SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert len(batch.texts) == 4
    engine.sync_weights(model.cuda())
    assert engine.canary(model, render_prompts(tok, ["1+2"])) < 1e-2
