"""LoRA (model.lora_rank > 0): only the adapters train, the merged weights equal the adapted model, and a run
exports a plain model that loads with from_pretrained and computes what the adapted policy computed."""
import copy

import pytest
import torch

from stagewise_pl.models.lora import apply_lora, has_lora, merged_state_dict


def test_merged_weights_compute_what_the_adapted_model_computes(tiny):
    from transformers import AutoModelForCausalLM

    policy = copy.deepcopy(tiny[0])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainable = apply_lora(policy, rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    assert has_lora(policy) and 0 < trainable < sum(p.numel() for p in policy.parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in policy.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # B starts at zero: train it so the adapters change the output
        loss = policy(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = merged_state_dict(policy)
    assert set(merged) == set(before)  # the plain model's keys: no adapter tensors
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"],
                       before["model.layers.0.self_attn.k_proj.weight"])
    plain = AutoModelForCausalLM.from_config(tiny[0].config)
    plain.load_state_dict(merged)
    policy.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_run_with_lora_trains_only_adapters_and_exports_merged_weights(tmp_path, fast_overrides):
    from stagewise_pl.config import load_config
    from stagewise_pl.models.load import load_policy
    from stagewise_pl.run import Run

    run = Run(load_config("default", fast_overrides + [f"run.dir={tmp_path / 'r'}", "model.lora_rank=4",
                                                        "eval.before=false",
                                                        "phases=[{kind: sft, steps: 4, lr: 1e-2}, "
                                                        "{kind: grpo, steps: 2, lr: 1e-3}]", "grpo.prompts_per_step=4",
                                                        "grpo.num_generations=4"]), log=lambda *_: None)
    run.execute()
    base, _ = load_policy(run.base_model_path(run.ctx.task))
    policy = run.ctx.policy
    for name, param in policy.named_parameters():  # frozen base weights never moved
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(param.detach(), base.state_dict()[key]), name
    exported, _ = load_policy(str(tmp_path / "r" / "final"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    policy.eval()
    with torch.no_grad():
        assert not torch.allclose(exported(ids).logits, base(ids).logits)  # the adapters trained
        torch.testing.assert_close(exported(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # three runs; the kill-resume kind is in the fast tier by test_stages
def test_a_lora_run_killed_mid_phase_resumes_with_its_adapters(tmp_path, fast_overrides):
    from helpers import fit, same_weights

    args = fast_overrides + ["model.lora_rank=4", "eval.before=false", "phases=[{kind: sft, steps: 6, lr: 1e-2}]",
                             "run.deterministic=true"]
    straight = fit(args + [f"run.dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = fit(args + [f"run.dir={tmp_path / 'killed'}"], {"STAGEWISE_FAULT": "checkpoint:1-sft:3"})
    assert killed.returncode == -9
    resumed = fit(args + [f"run.dir={tmp_path / 'killed'}", "resume=last"])
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "straight" / "final", tmp_path / "killed" / "final")
