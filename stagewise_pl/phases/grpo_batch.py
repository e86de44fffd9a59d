"""A GRPO rollout step's graded groups as tensors, and the policy's forward over them.

:class:`Groups` holds the graded completions of a step, prompt-major (G per prompt). :func:`batch_tensors`
lays them out as one (N, Lp + Lc) batch of left-padded prompts and right-padded completions.
:func:`completion_hidden` gives the hidden states that predict each completion token; when rows share a
prompt (a group's G samples) each distinct prompt is computed once (see its docstring), and the gradient flows
through the shared prompt exactly as through G copies (tested against G full forwards).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from stagewise_pl import dist
from stagewise_pl.data.problems import Problem
from stagewise_pl.data.sft import additive_mask

PACK_LIMIT = 1024  # longest packed prompt + completions sequence (its dense block mask is PACK_LIMIT^2)


@dataclass
class Groups:
    """Graded groups of one rollout step (prompt-major, like RolloutBatch)."""

    problems: list[Problem]
    prompt_ids: list[list[int]]  # one per prompt
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    rewards: torch.Tensor  # (P, G)
    reasons: list[str]
    rounds: list[int]  # generation round of each prompt

    @staticmethod
    def concat(parts: Sequence["Groups"]) -> "Groups":
        return Groups([p for g in parts for p in g.problems], [x for g in parts for x in g.prompt_ids],
                      [x for g in parts for x in g.completion_ids], [x for g in parts for x in g.texts],
                      [x for g in parts for x in g.truncated], torch.cat([g.rewards for g in parts]),
                      [x for g in parts for x in g.reasons], [x for g in parts for x in g.rounds])

    def select(self, keep: list[int]) -> "Groups":
        g = self.rewards.shape[1]
        rows = [i * g + j for i in keep for j in range(g)]
        return Groups([self.problems[i] for i in keep], [self.prompt_ids[i] for i in keep],
                      [self.completion_ids[r] for r in rows], [self.texts[r] for r in rows],
                      [self.truncated[r] for r in rows], self.rewards[keep], [self.reasons[r] for r in rows],
                      [self.rounds[i] for i in keep])

    def records(self, spec, kind: str, step: int, global_step: int) -> list:
        """The ledger rows of these groups, graded at rollout ``step`` of phase ``spec`` (of ``kind``)."""
        from stagewise_pl.records import RolloutRecord

        g, out = self.rewards.shape[1], []
        for i, problem in enumerate(self.problems):
            zero = bool((self.rewards[i] <= 0).all())
            for j in range(g):
                r, reward = i * g + j, float(self.rewards[i, j])
                out.append(RolloutRecord(spec.name, kind, step, problem.id, j, reward, self.reasons[r],
                                         len(self.completion_ids[r]), self.truncated[r], zero,
                                         self.texts[r] if reward <= 0 else None, self.rounds[i], spec.number,
                                         global_step))
        return out


def informative(rewards: torch.Tensor) -> list[int]:
    """Indices of groups whose rewards are not all equal."""
    return (rewards.max(-1).values > rewards.min(-1).values).nonzero()[:, 0].tolist()


def batch_tensors(groups: Groups, advantages: torch.Tensor, pad_id: int, mask_truncated: bool,
                  device) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded completions as one (N, Lp + Lc) batch, with the completion mask
    (truncated completions masked out with ``mask_truncated``) and each row's advantage."""
    n = len(groups.completion_ids)
    lp = max(len(x) for x in groups.prompt_ids)
    lc = max(1, max(len(x) for x in groups.completion_ids))
    ids = torch.full((n, lp + lc), pad_id, dtype=torch.long)
    attn = torch.zeros((n, lp + lc), dtype=torch.long)
    g = groups.rewards.shape[1]
    for r, c in enumerate(groups.completion_ids):
        p = groups.prompt_ids[r // g]
        ids[r, lp - len(p):lp] = torch.tensor(p)
        attn[r, lp - len(p):lp] = 1
        if c:
            ids[r, lp:lp + len(c)] = torch.tensor(c)
            attn[r, lp:lp + len(c)] = 1
    mask = attn[:, lp:].clone().float()
    if mask_truncated:
        mask[torch.tensor(groups.truncated, dtype=torch.bool)] = 0.0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": positions.to(device),
            "targets": ids[:, lp:].to(device), "mask": mask.to(device), "prompt_len": lp,
            "prompt_index": torch.arange(n, device=device) // g,
            "prompt_lens": torch.tensor([len(groups.prompt_ids[r // g]) for r in range(n)], device=device),
            "completion_lens": torch.tensor([len(c) for c in groups.completion_ids], device=device),
            "advantages": advantages.reshape(-1).to(device)}


def _cache_kwarg(module) -> str:
    """The name a decoder's forward takes its key/value cache under (newer transformers: ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def completion_hidden(model, t: dict, rows: torch.Tensor, pad_id: int, shared_prefix: bool = True) -> torch.Tensor:
    """Hidden states that predict the completion tokens of ``rows``: (R, Lc, H).

    When the rows share prompts (a group's G samples), each distinct prompt is computed once (``shared_prefix``):
    its rows' completions are packed after it in one sequence, each completion seeing the prompt and itself only
    (a block mask), when that sequence is at most ``PACK_LIMIT`` tokens; otherwise the prompt's key/value cache is
    gathered to its rows and the completions run as a batch. Without sharing, one forward pass over prompt +
    completion per row.
    """
    decoder = getattr(model, model.base_model_prefix)
    lp, lc = t["prompt_len"], t["targets"].shape[1]
    prompts, inverse = torch.unique(t["prompt_index"][rows], return_inverse=True)
    if shared_prefix and len(prompts) * 2 <= len(rows):
        packed = _packed_hidden(model, decoder, t, rows, inverse, len(prompts), pad_id)
        if packed is not None:
            return packed
        first = rows.new_empty(len(prompts))
        first[inverse] = rows  # one row per distinct prompt
        head = decoder(input_ids=t["input_ids"][first, :lp], attention_mask=t["attention_mask"][first, :lp],
                       position_ids=t["position_ids"][first, :lp], use_cache=True)
        cache = getattr(head, "cache", None) or head.past_key_values
        cache.batch_select_indices(inverse)  # gather (differentiable): each row gets its prompt's keys/values
        tail = decoder(input_ids=t["input_ids"][rows, lp:], attention_mask=t["attention_mask"][rows],
                       position_ids=t["position_ids"][rows, lp:], use_cache=False,
                       **{_cache_kwarg(decoder): cache}).last_hidden_state
        return torch.cat([head.last_hidden_state[inverse, -1:], tail[:, :-1]], 1)
    out = decoder(input_ids=t["input_ids"][rows], attention_mask=t["attention_mask"][rows],
                  position_ids=t["position_ids"][rows], use_cache=False).last_hidden_state
    return out[:, lp - 1:lp - 1 + lc]


def _packed_hidden(model, decoder, t: dict, rows: torch.Tensor, inverse: torch.Tensor, n_prompts: int,
                   pad_id: int) -> Optional[torch.Tensor]:
    """One sequence per distinct prompt: the prompt, then each of its rows' completions; None when the longest
    such sequence exceeds PACK_LIMIT tokens."""
    lp, lc = t["prompt_len"], t["targets"].shape[1]
    plen, clen = t["prompt_lens"][rows].tolist(), t["completion_lens"][rows].tolist()
    members: list[list[int]] = [[] for _ in range(n_prompts)]
    for i, u in enumerate(inverse.tolist()):
        members[u].append(i)
    lengths = [plen[m[0]] + sum(clen[i] for i in m) for m in members]
    width = max(lengths)
    if width > PACK_LIMIT:
        return None
    device, source = rows.device, t["input_ids"][rows]
    ids = torch.full((n_prompts, width), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros((n_prompts, width), dtype=torch.long, device=device)
    seg = -2 - torch.arange(n_prompts * width, device=device).view(n_prompts, width)  # padding: its own segment
    gather = torch.zeros((len(rows), lc), dtype=torch.long, device=device)
    for u, m in enumerate(members):
        p = plen[m[0]]
        ids[u, :p], pos[u, :p], seg[u, :p] = source[m[0], lp - p:lp], torch.arange(p, device=device), 0
        offset = p
        for k, i in enumerate(m, start=1):
            c = clen[i]
            ids[u, offset:offset + c] = source[i, lp:lp + c]
            pos[u, offset:offset + c] = torch.arange(p, p + c, device=device)
            seg[u, offset:offset + c] = k
            # completion token j is predicted at the position before it: the prompt's last token for j = 0
            gather[i, 0] = u * width + p - 1
            gather[i, 1:c] = u * width + offset + torch.arange(c - 1, device=device)
            offset += c
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)) & causal  # (U, L, L)
    mask = allowed[:, None]
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        mask = additive_mask(mask, model.dtype)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return out.reshape(n_prompts * width, -1)[gather]


def micro_slices(n: int, micro_batch_size: int) -> list[slice]:
    """Consecutive micro-batches of ``n`` rows (``micro_batch_size``; 0 = one); none when ``n`` is 0."""
    size = micro_batch_size or max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)]


def my_micro_slices(n: int, micro_batch_size: int) -> list[Optional[slice]]:
    """This rank's micro-batches of a mini-batch of ``n`` rows. Every rank gets the same number (None = a rank
    with nothing left makes an empty backward, so the gradient all-reduce stays in step). ``n = 0`` (every row
    skipped by :func:`rows_with_gradient`): one empty backward, so the optimizer step that follows still comes."""
    if n == 0:
        return [None]
    world = dist.world_size()
    if world == 1:
        return micro_slices(n, micro_batch_size)
    if micro_batch_size:
        parts = micro_slices(n, micro_batch_size)
    else:
        bounds = [round(i * n / world) for i in range(world + 1)]
        parts = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    mine: list[Optional[slice]] = list(parts[dist.rank()::world])
    return mine + [None] * (-(-len(parts) // world) - len(mine))


def rows_with_gradient(mb: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor, ent_weights: torch.Tensor,
                       s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mini-batch ``mb`` (row indices) without the rows whose gradient is exactly zero, with their aggregation and
    entropy weights (computed over the whole mini-batch, so the normaliser is unchanged): rows whose advantage is 0
    everywhere (every row of a flat group when ``drop_flat_groups`` is off), when the loss has no KL and no entropy
    term. The clipped surrogate is 0 at A = 0 for any ratio, so the update is the same with or without them; their
    forward and backward are not paid for. ``s.skip_zero_advantage_rows`` off, or nothing to skip: unchanged."""
    keep = _gradient_positions(mb, advantages, s)
    return (mb, weights, ent_weights) if keep is None else (mb[keep], weights[keep], ent_weights[keep])


def _gradient_positions(mb: torch.Tensor, advantages: torch.Tensor, s) -> Optional[torch.Tensor]:
    """Positions in ``mb`` of the rows :func:`rows_with_gradient` keeps; None when it keeps them all."""
    if not s.skip_zero_advantage_rows or s.loss.beta or s.loss.entropy_coef:
        return None
    keep = advantages[mb].reshape(len(mb), -1).ne(0).any(1).nonzero()[:, 0]
    return None if len(keep) == len(mb) else keep


def old_logprobs(model, t: dict, frozen: dict, s) -> Optional[torch.Tensor]:
    """The old policy's log-probs of the batch ``t``, taken before the update's first optimizer step; None when the
    update makes one step per batch (``num_iterations`` and ``minibatches`` 1: the ratio's denominator is the
    current log-prob, detached). Only the rows that get a gradient in some mini-batch are computed (the others are
    0 and never read): with ``skip_zero_advantage_rows`` a flat group costs no forward here either."""
    if s.num_iterations == 1 and s.minibatches == 1:
        return None
    everyone = torch.arange(t["targets"].shape[0], device=t["targets"].device)
    keep = _gradient_positions(everyone, t["advantages"], s)
    return completion_logprobs(model, t, **frozen, rows=None if keep is None else everyone[keep])


@torch.no_grad()
def completion_logprobs(model, t: dict, pad_id: int, micro_batch_size: int, shared_prefix: bool, temperature: float,
                        backend: str, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log-probs of every completion token of the batch ``t`` under ``model`` (no gradient): the old policy's or
    the KL reference's, in micro-batches. With ``rows``, only those rows are computed; the others are 0."""
    from stagewise_pl.kernels import logprobs

    head = model.get_output_embeddings()
    out = []
    chosen = torch.arange(t["targets"].shape[0], device=t["targets"].device) if rows is None else rows
    for part in micro_slices(len(chosen), micro_batch_size):
        r = chosen[part]
        targets = torch.where(t["mask"][r].bool(), t["targets"][r], torch.full_like(t["targets"][r], -100))
        logp, _ = logprobs(completion_hidden(model, t, r, pad_id, shared_prefix), head.weight, targets,
                           getattr(head, "bias", None), temperature=temperature, backend=backend)
        out.append(logp)
    if rows is None:
        return torch.cat(out)
    full = t["targets"].new_zeros(t["targets"].shape, dtype=out[0].dtype if out else torch.float32)
    if out:
        full[rows] = torch.cat(out)
    return full
