"""The policy's forward over prompts and their sampled completions: the hidden states that predict each completion
token, computing a prompt shared by several rows once, and the completion tokens' log-probs.

:class:`CompletionBatch` is the layout: left-padded prompts and right-padded completions as one (N, Lp + Lc) batch,
with the completion mask and a value per row (a GRPO step's advantages). :func:`completion_hidden` gives the hidden
states that predict the completion tokens of some rows; when rows share a prompt (a group's G samples) each
distinct prompt is computed once (see its docstring), and the gradient flows through the shared prompt exactly as
through G copies (tested against G full forwards). :func:`completion_logprobs` is the no-gradient pass (an old
policy's or a reference's log-probs), in micro-batches, with :class:`ForwardSettings`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from stagewise_pl.data.sft import additive_mask

PACK_LIMIT = 1024  # longest packed prompt + completions sequence (its dense block mask is PACK_LIMIT^2)


@dataclass
class CompletionBatch:
    """Prompts and completions laid out for the forward (built by ``phases.grpo_batch.batch_tensors``)."""

    input_ids: torch.Tensor  # (N, Lp + Lc): left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # (N, Lp + Lc)
    position_ids: torch.Tensor  # (N, Lp + Lc)
    targets: torch.Tensor  # (N, Lc): the completion tokens
    mask: torch.Tensor  # (N, Lc) float: the completion tokens that count
    prompt_len: int  # Lp
    prompt_index: torch.Tensor  # (N,): the prompt of each row (rows of one prompt share it)
    prompt_lens: torch.Tensor  # (N,): each row's prompt length without padding
    completion_lens: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,) or (N, Lc): a value per row (or per token) the loss weighs the row by
    rollout_logp: Optional[torch.Tensor] = None  # (N, Lc): the engine's log-prob of each completion token (0 past it)


@dataclass
class ForwardSettings:
    """How :func:`completion_logprobs` runs its passes."""

    pad_id: int
    micro_batch_size: int = 0  # rows per pass; 0 = all at once
    shared_prefix: bool = True  # each distinct prompt computed once
    temperature: float = 1.0  # the log-probs are of the logits divided by it
    backend: str = "auto"  # the fused kernels' backend (trainer.kernel)


def _cache_kwarg(module) -> str:
    """The name a decoder's forward takes its key/value cache under (newer transformers: ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def completion_hidden(model, t: CompletionBatch, rows: torch.Tensor, pad_id: int,
                      shared_prefix: bool = True) -> torch.Tensor:
    """Hidden states that predict the completion tokens of ``rows``: (R, Lc, H).

    When the rows share prompts (a group's G samples), each distinct prompt is computed once (``shared_prefix``):
    its rows' completions are packed after it in one sequence, each completion seeing the prompt and itself only
    (a block mask), when that sequence is at most ``PACK_LIMIT`` tokens; otherwise the prompt's key/value cache is
    gathered to its rows and the completions run as a batch. Without sharing, one forward pass over prompt +
    completion per row.
    """
    decoder = getattr(model, model.base_model_prefix)
    lp, lc = t.prompt_len, t.targets.shape[1]
    prompts, inverse = torch.unique(t.prompt_index[rows], return_inverse=True)
    if shared_prefix and len(prompts) * 2 <= len(rows):
        packed = _packed_hidden(model, decoder, t, rows, inverse, len(prompts), pad_id)
        if packed is not None:
            return packed
        first = rows.new_empty(len(prompts))
        first[inverse] = rows  # one row per distinct prompt
        head = decoder(input_ids=t.input_ids[first, :lp], attention_mask=t.attention_mask[first, :lp],
                       position_ids=t.position_ids[first, :lp], use_cache=True)
        cache = getattr(head, "cache", None) or head.past_key_values
        cache.batch_select_indices(inverse)  # gather (differentiable): each row gets its prompt's keys/values
        tail = decoder(input_ids=t.input_ids[rows, lp:], attention_mask=t.attention_mask[rows],
                       position_ids=t.position_ids[rows, lp:], use_cache=False,
                       **{_cache_kwarg(decoder): cache}).last_hidden_state
        return torch.cat([head.last_hidden_state[inverse, -1:], tail[:, :-1]], 1)
    out = decoder(input_ids=t.input_ids[rows], attention_mask=t.attention_mask[rows],
                  position_ids=t.position_ids[rows], use_cache=False).last_hidden_state
    return out[:, lp - 1:lp - 1 + lc]


def _packed_hidden(model, decoder, t: CompletionBatch, rows: torch.Tensor, inverse: torch.Tensor, n_prompts: int,
                   pad_id: int) -> Optional[torch.Tensor]:
    """One sequence per distinct prompt: the prompt, then each of its rows' completions; None when the longest
    such sequence exceeds PACK_LIMIT tokens."""
    lp, lc = t.prompt_len, t.targets.shape[1]
    plen, clen = t.prompt_lens[rows].tolist(), t.completion_lens[rows].tolist()
    members: list[list[int]] = [[] for _ in range(n_prompts)]
    for i, u in enumerate(inverse.tolist()):
        members[u].append(i)
    lengths = [plen[m[0]] + sum(clen[i] for i in m) for m in members]
    width = max(lengths)
    if width > PACK_LIMIT:
        return None
    device, source = rows.device, t.input_ids[rows]
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



@torch.no_grad()
def completion_logprobs(model, t: CompletionBatch, fwd: ForwardSettings,
                        rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log-probs of every completion token of the batch ``t`` under ``model`` (no gradient): the old policy's or
    the KL reference's, in micro-batches. With ``rows``, only those rows are computed; the others are 0."""
    from stagewise_pl.kernels import logprobs

    head = model.get_output_embeddings()
    out = []
    chosen = torch.arange(t.targets.shape[0], device=t.targets.device) if rows is None else rows
    for part in micro_slices(len(chosen), fwd.micro_batch_size):
        r = chosen[part]
        targets = torch.where(t.mask[r].bool(), t.targets[r], torch.full_like(t.targets[r], -100))
        logp, _ = logprobs(completion_hidden(model, t, r, fwd.pad_id, fwd.shared_prefix), head.weight, targets,
                           getattr(head, "bias", None), temperature=fwd.temperature, backend=fwd.backend)
        out.append(logp)
    if rows is None:
        return torch.cat(out)
    full = t.targets.new_zeros(t.targets.shape, dtype=out[0].dtype if out else torch.float32)
    if out:
        full[rows] = torch.cat(out)
    return full
