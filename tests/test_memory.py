"""The --dry-run memory estimate: parameter counts from shapes alone, the recipes' dry runs."""
import json
import subprocess
import sys

import pytest
import torch

from stagewise_pl.config import load_config
from stagewise_pl.memory import KNOWN, estimate, shape_from_config


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen2", False), ("llama", True), ("llama", False)])
def test_parameters_from_the_shape_equal_the_models(kind, tied, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                                  num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                                  tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    shape = shape_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert shape.parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,billions", [("Qwen/Qwen2.5-0.5B-Instruct", 0.494), ("Qwen/Qwen2.5-1.5B-Instruct", 1.544),
                                           ("Qwen/Qwen2.5-3B-Instruct", 3.086),
                                           ("meta-llama/Llama-3.2-1B-Instruct", 1.236)])
def test_known_shapes_give_the_published_sizes(name, billions):
    assert KNOWN[name].parameters() / 1e9 == pytest.approx(billions, rel=0.005)


def test_every_ddp_rank_holds_the_whole_model():
    base = ["model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct", "model.dtype=bfloat16"]
    one, ddp = (estimate(load_config("default", base + [f"trainer.devices={d}", "trainer.strategy=ddp"]))
                for d in (1, 4))
    assert one == ddp
    assert ddp["weights"] == pytest.approx(1.544e9 * 2 / 2**30, abs=0.01)
    assert estimate(load_config("default", ["model.name_or_path=someone/unknown-model"])) is None


@pytest.mark.parametrize("conf,size", [("qwen1.5b", "1.54B"),
                                       pytest.param("llama3.2-1b", "1.24B", marks=pytest.mark.slow)])
def test_gpu_recipes_dry_run_on_a_machine_without_the_shared_data(conf, size, tmp_path):
    """Run from a directory with no ../shared: the plan, the memory estimate, and the datasets named by hub name
    (the pool, the benchmarks) with where each comes from; every name resolves to a loader: exit 0. A benchmark
    file moved away is named with its public source (exit 4)."""
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", f"conf={conf}", "--dry-run"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "r1-bridge: bridge_sft on hard, 2 epochs" in out.stdout and "r1-cft: cft on unsolved_in_rl" in out.stdout
    assert f"memory estimate per GPU (arithmetic, not measured): {size} parameters in bfloat16" in out.stdout
    hub = "datasets.load_dataset from the Hugging Face hub (https://huggingface.co/datasets/openai/gsm8k) or the"
    assert f"dataset data.path: hf:openai/gsm8k:main:train: {hub} datasets cache, rows read as format gsm8k" \
        in out.stdout
    for name, fmt in (("HuggingFaceH4/MATH-500::test", "math500"), ("HuggingFaceH4/aime_2024::train", "aime24"),
                      ("math-ai/amc23::test", "amc23"), ("openai/gsm8k:main:test", "gsm8k")):
        assert f"dataset eval.benchmarks: hf:{name}: datasets.load_dataset" in out.stdout
        assert f"format {fmt}" in out.stdout
    assert "MISSING" not in out.stdout and "file data.path" not in out.stdout
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", f"conf={conf}", "--dry-run",
                          "eval.benchmarks=[nowhere/math500.jsonl]"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stderr[-2000:]
    assert "nowhere/math500.jsonl (eval.benchmarks): download the MATH-500 split" in out.stderr


@pytest.mark.parametrize("conf", ["qwen1.5b", "llama3.2-1b"])
def test_the_recipes_grade_numeric_golds_literally_and_expressions_by_equivalence(conf):
    """literal_answers, decided from the golds: GSM8K's numbers must be answered with a number (a restated sum is
    not evaluated), MATH's expressions are still graded by equivalence; the dataset teacher's answer line is what
    the verifier reads."""
    from stagewise_pl.config import load_config
    from stagewise_pl.teachers.dataset import render_solution
    from stagewise_pl.verify.math import MathVerifier

    cfg = load_config(conf, [])
    verifier = MathVerifier(**cfg.verifier.options)
    assert verifier.score("So she sold 72 clips. The answer is \\boxed{72}.", "72").reason == "correct"
    assert verifier.score("The answer is \\boxed{70+2}.", "72").reason == "unevaluated"
    assert verifier.score("Thus \\boxed{\\sqrt{3}/2}.", "\\frac{\\sqrt{3}}{2}").reason == "correct"
    assert verifier.score("So \\boxed{1+x^2}.", "x^2+1").reason == "correct"
    trace = render_solution("48/2 = 24 clips\n#### 72", "72", cfg.teacher.args["answer_line"])
    assert cfg.teacher.name == "dataset" and verifier.score(trace, "72").reason == "correct"


def test_lora_keeps_gradients_and_moments_to_the_adapters(tiny):
    from stagewise_pl.models.lora import apply_lora
    import copy

    base = ["model.name_or_path=Qwen/Qwen2.5-1.5B-Instruct", "model.dtype=bfloat16"]
    full, lora = estimate(load_config("default", base)), estimate(load_config("default", base + ["model.lora_rank=16"]))
    assert lora["AdamW moments"] < full["AdamW moments"] / 50 and lora["weights"] >= full["weights"]
    policy = copy.deepcopy(tiny[0])  # the adapter count from the shape equals peft's
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainable = apply_lora(policy, rank=4, alpha=8, dropout=0.0, targets=targets)
    assert shape_from_config(policy.config.to_dict()).lora_parameters(4, targets) == trainable
