import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stagewise_pl.models.load import count_parameters, load_policy, render_prompt


def test_about_one_million_parameters(tiny):
    model, _ = tiny
    assert 0.5e6 < count_parameters(model) < 1.5e6
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings


def test_autotokenizer_matches_raw_tokenizer(tiny_model_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["<|im_start|>user\n123+45-6<|im_end|>\n", "The answer is 1,234.5 \\boxed{\\frac{1}{2}}", "café 42"]
    for text in texts:
        assert auto(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids


def test_digits_are_one_token_each(tiny):
    _, tokenizer = tiny
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("98765+1234", add_special_tokens=False)["input_ids"])
    assert tokens == list("98765+1234")


def test_chatml_template(tiny):
    _, tokenizer = tiny
    text = render_prompt(tokenizer, "1+2")
    assert text == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_save_load_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(str(tmp_path))
    ids = torch.tensor([tokenizer("<|im_start|>user\n12+7<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        expected = model.eval()(ids).logits
        assert torch.equal(again.eval()(ids).logits, expected)
        assert torch.equal(loaded.eval()(ids).logits, expected)
    assert loaded_tok("12+7")["input_ids"] == tokenizer("12+7")["input_ids"]


def test_tiny_base_model_is_cached(cache_dir, fast_overrides, monkeypatch):
    from stagewise_pl.config import load_config
    from stagewise_pl.models import base
    from stagewise_pl.phases import warmup
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    cfg = load_config("default", fast_overrides)
    task = ArithmeticTask.from_config(cfg.task)
    first = warmup.tiny_base_model(cfg, task, log=lambda *_: None)
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cached base model was rebuilt")

    monkeypatch.setattr(warmup, "build", must_not_build)
    assert warmup.tiny_base_model(cfg, task) == first
    other = load_config("default", fast_overrides + ["model.warmup.steps=21"])
    assert base.base_key(other) != base.base_key(cfg)


def test_the_base_models_warm_up_prints_progress_lines_into_a_file(tmp_path, fast_overrides, monkeypatch):
    """Output that is not a terminal (a log file, pytest's capture): the warm-up reports a line every 10 s with the
    steps done, of how many, and the time left (a clock that moves 11 s per reading stands in for a slow build)."""
    from stagewise_pl.config import load_config
    from stagewise_pl.phases import driver, warmup
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    class Clock:
        now = 0.0

        def monotonic(self):
            self.now += 11.0
            return self.now

    monkeypatch.setattr(driver, "time", Clock())
    cfg = load_config("default", fast_overrides + ["run.progress_bar=true", "model.warmup.steps=4"])
    lines = []
    warmup.build(cfg, ArithmeticTask.from_config(cfg.task), tmp_path / "base", log=lines.append)
    steps = [line for line in lines if line.startswith("tiny base warm-up: step")]
    assert steps[0] == "tiny base warm-up: step 1/4, 11 s, about 33 s left"
    assert steps[-1].startswith("tiny base warm-up: step 4/4")
    assert (tmp_path / "base" / "model.safetensors").is_file()
    off = load_config("default", fast_overrides + ["run.progress_bar=false"])
    assert driver.progress_callbacks(off.run) == []


def test_the_live_bar_names_the_phase_and_counts_steps():
    from types import SimpleNamespace

    from stagewise_pl.phases.driver import step_bar

    bar = step_bar("phase r1-grpo", 40)
    assert bar._get_train_description(0) == "phase r1-grpo" and bar.total_train_batches == 40
    bar.relabel("phase r1-cft")
    assert bar._get_train_description(0) == "phase r1-cft"
    column = bar.configure_columns(None)[2]
    assert column.render(SimpleNamespace(completed=8, total=40)).plain == "8/40 steps"
    assert column.render(SimpleNamespace(completed=8, total=float("inf"))).plain == "8 steps"
