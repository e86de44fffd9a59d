import math

import numpy as np
import pytest
import torch

from stagewise_pl.data.sft import Example, encode_example, pack_collate, pack_rows, pad_collate, StepBatchSampler
from stagewise_pl.losses import IGNORE_INDEX, masked_mean_nll
from stagewise_pl.models.load import render_prompt
from stagewise_pl.models.forward import sft_loss
from stagewise_pl.phases.optim import cosine_with_warmup


def test_loss_ignores_prompt_and_padding_by_hand():
    # vocabulary of 3, one sequence of 4 tokens: prompt [0, 1], completion [2, 0], then one pad.
    logits = torch.log(torch.tensor([[[0.2, 0.3, 0.5]] * 5]))  # every position predicts (0.2, 0.3, 0.5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    loss, count = masked_mean_nll(logits, labels)
    # supervised targets: position 1 -> token 2 (p=0.5), position 2 -> token 0 (p=0.2)
    assert count.item() == 2
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.2)) / 2, rel=1e-6)


def test_prompt_and_pad_logits_get_no_gradient():
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX],
                           [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    loss, _ = masked_mean_nll(logits, labels)
    loss.backward()
    grad_rows = logits.grad.abs().sum(-1)  # (B, T)
    # position t is supervised when labels[t+1] is a completion token
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(grad_rows > 0, expected)


def test_encode_masks_the_prompt(tiny):
    _, tokenizer = tiny
    prompt = render_prompt(tokenizer, "12+7")
    ex = encode_example(tokenizer, prompt, "12+7=19\n#### 19", max_length=128)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id and not ex.truncated
    short = encode_example(tokenizer, prompt, "12+7=19\n#### 19", max_length=n_prompt + 2)
    assert short.truncated and len(short.input_ids) == n_prompt + 2


def test_pad_collate_shapes_and_masks():
    batch = pad_collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [IGNORE_INDEX])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pack_rows_respects_the_budget():
    lengths = [50, 40, 30, 20, 10, 60, 5]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) < len(lengths)


def random_examples(n: int, vocab: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, c = int(rng.integers(3, 12)), int(rng.integers(2, 15))
        ids = rng.integers(3, vocab, size=p + c).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * p + ids[p:]))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float64)
    examples = random_examples(9, model.config.vocab_size, seed=1)
    padded, packed = pad_collate(examples, pad_id=0), pack_collate(examples, pad_id=0, max_length=40)
    assert packed["input_ids"].shape[0] < len(examples)  # really packed
    loss_pad, n_pad = sft_loss(model, padded)
    grad_pad = torch.autograd.grad(loss_pad, model.model.embed_tokens.weight)[0]
    loss_pack, n_pack = sft_loss(model, packed)
    grad_pack = torch.autograd.grad(loss_pack, model.model.embed_tokens.weight)[0]
    assert n_pad == n_pack
    assert loss_pack.item() == pytest.approx(loss_pad.item(), abs=1e-10)
    assert torch.allclose(grad_pack, grad_pad, atol=1e-10)


def test_packing_without_block_mask_would_differ(tiny_model_dir):
    """The block-diagonal mask is what makes packing exact: plain causal attention across examples is not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    examples = random_examples(6, model.config.vocab_size, seed=2)
    padded, packed = pad_collate(examples, 0), pack_collate(examples, 0, 40)
    with torch.no_grad():
        ref = masked_mean_nll(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                              padded["labels"])[0]
        leaky = masked_mean_nll(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits,
                                packed["labels"])[0]
    assert abs(leaky.item() - ref.item()) > 1e-4


def test_cosine_schedule():
    assert cosine_with_warmup(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100, 0.1) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert cosine_with_warmup(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_batch_order_is_seeded_and_resumable():
    sampler = StepBatchSampler(50, 8, 20, seed=3)
    full = list(sampler)
    assert len(full) == 20 and all(len(b) == 8 for b in full)
    assert list(StepBatchSampler(50, 8, 20, seed=3)) == full
    assert list(StepBatchSampler(50, 8, 20, seed=4)) != full
    resumed = StepBatchSampler(50, 8, 20, seed=3)
    assert [resumed.batch(b) for b in range(7, 20)] == full[7:]  # a resumed phase asks for its next batch
    # one pass sees every example once before any repeats
    first_pass = [i for b in full[:6] for i in b]
    assert len(set(first_pass)) == len(first_pass)


def test_batch_order_shards_across_ranks():
    ranks = [list(StepBatchSampler(40, 4, 5, seed=0, rank=r, world_size=2)) for r in range(2)]
    for b in range(5):
        assert not set(ranks[0][b]) & set(ranks[1][b])


def test_weighted_order_follows_weights():
    weights = [0.0] * 10 + [1.0] * 10
    seen = {i for b in StepBatchSampler(20, 16, 10, seed=0, weights=weights) for i in b}
    assert seen <= set(range(10, 20))


def test_module_loss_equals_the_logits_path(tiny_model_dir):
    """The fused-kernel SFT loss equals cross-entropy over full logits, value and gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    batch = pad_collate(random_examples(5, model.config.vocab_size, seed=3), pad_id=0)
    fused, count = sft_loss(model, batch)
    grad_fused = torch.autograd.grad(fused, model.model.embed_tokens.weight)[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain, plain_count = masked_mean_nll(logits, batch["labels"])
    grad_plain = torch.autograd.grad(plain, model.model.embed_tokens.weight)[0]
    assert count == plain_count and fused.item() == pytest.approx(plain.item(), abs=1e-12)
    assert torch.allclose(grad_fused, grad_plain, atol=1e-12)
