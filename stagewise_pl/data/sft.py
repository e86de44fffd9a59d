"""SFT examples: tokenisation with the prompt masked, padding or packing, and a resumable batch order.

Packing puts several examples in one row and gives the model a block-diagonal causal mask (a 4-D
additive mask) with position ids restarting at each example, so attention never crosses an example
boundary and the packed loss equals the unpacked loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from stagewise_pl.losses import IGNORE_INDEX


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt
    truncated: bool = False
    weight: float = 1.0  # loss weight of this example's tokens (critique fine-tuning weighs its kinds)


def encode_example(tokenizer, prompt_text: str, completion: str, max_length: int, weight: float = 1.0) -> Example:
    """Prompt (already chat-rendered) + completion + EOS; loss only on completion and EOS."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return example_from_ids(prompt_ids, completion_ids, tokenizer.eos_token_id, max_length, weight)


def example_from_ids(prompt_ids: list[int], completion_ids: list[int], eos_id: int, max_length: int,
                     weight: float = 1.0) -> Example:
    """The example of a tokenized prompt and completion (EOS appended to the completion)."""
    completion_ids = list(completion_ids) + [eos_id]
    ids = list(prompt_ids) + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated, weight)


def pad_collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels, attention_mask, all (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.ones((len(examples), width))
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        weights[row, :n] = e.weight
    return with_weights({"input_ids": ids, "labels": labels, "attention_mask": mask}, weights, examples)


def with_weights(batch: dict, weights: torch.Tensor, examples: Sequence[Example]) -> dict:
    """Adds ``loss_weights`` (per label position) only when some example is not weighted 1."""
    if any(e.weight != 1.0 for e in examples):
        batch["loss_weights"] = weights
    return batch


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing assignment of examples to rows of at most ``max_length`` tokens."""
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(max_length - lengths[i])
    return rows


def pack_collate(examples: Sequence[Example], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Packed batch: input_ids, labels, position_ids (B, T) and a block-diagonal causal mask (B, 1, T, T).

    The mask is boolean (True = may attend), which sdpa takes directly and faster than an additive
    float mask; :func:`additive_mask` converts it for attention implementations that need one.
    """
    rows = pack_rows([len(e.input_ids) for e in examples], max_length)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    weights = torch.ones((n_rows, width))
    for r, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row):
            e = examples[i]
            n = len(e.input_ids)
            ids[r, start:start + n] = torch.tensor(e.input_ids)
            labels[r, start:start + n] = torch.tensor(e.labels)
            positions[r, start:start + n] = torch.arange(n)
            segment[r, start:start + n] = s
            weights[r, start:start + n] = e.weight
            start += n
        # padding: each pad token is its own segment, so no row of the mask is empty
        segment[r, start:] = torch.arange(width - start) + len(row)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    return with_weights({"input_ids": ids, "labels": labels, "position_ids": positions,
                         "attention_mask": allowed[:, None]}, weights, examples)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (True = attend) 4-D mask -> additive mask (0 or the dtype's minimum), for eager attention."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class Collator:
    def __init__(self, pad_id: int, max_length: int, packing: bool):
        self.pad_id, self.max_length, self.packing = pad_id, max_length, packing

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.packing:
            return pack_collate(examples, self.pad_id, self.max_length)
        return pad_collate(examples, self.pad_id)


class StepBatchSampler(Sampler[list[int]]):
    """A fixed, seeded sequence of ``num_batches`` batches, any of which can be asked for on its own.

    Batch b is a pure function of (seed, b): uniform order reshuffles each pass over the data;
    with ``weights`` every batch is drawn with replacement by weight. A resumed phase asks for the
    batch of its next step, so it continues with exactly the data it had not seen.
    With several ranks, each takes its slice of a global batch of ``batch_size * world_size``.
    """

    def __init__(self, n_examples: int, batch_size: int, num_batches: int, seed: int,
                 weights: Optional[Sequence[float]] = None, rank: int = 0, world_size: int = 1):
        if n_examples <= 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.num_batches, self.seed = n_examples, batch_size, num_batches, seed
        self.rank, self.world = rank, world_size
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)

    def global_batch(self, b: int) -> np.ndarray:
        size = self.batch_size * self.world
        if self.weights is not None:
            return np.random.default_rng([self.seed, b]).choice(self.n, size=size, p=self.weights)
        per_pass = max(1, self.n // size) if self.n >= size else 1
        epoch, offset = divmod(b, per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if self.n < size:  # fewer examples than a batch: repeat the permutation
            order = np.resize(order, size)
            offset = 0
        return order[offset * size:(offset + 1) * size]

    def batch(self, b: int) -> list[int]:
        """This rank's slice of global batch ``b``."""
        return self.global_batch(b)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __iter__(self):
        for b in range(self.num_batches):
            yield self.batch(b)

    def __len__(self) -> int:
        return self.num_batches
