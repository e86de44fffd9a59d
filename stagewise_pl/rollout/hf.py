"""HFEngine: sampling with a transformers model and its KV cache (CPU and GPU), no vLLM needed.

Where the time goes and what is cut (measured on the tiny base model, 64 prompts x 8 samples):
``model.generate`` keeps computing every row until the longest one ends, so with completions of
very different lengths most of its work is on finished rows. Here the decoding loop is our own:
- each prompt is encoded and prefilled once, and its KV cache copied to its ``n`` samples
  (``batch_repeat_interleave``), instead of ``n`` prefills of the same prompt;
- only the last position's logits are computed (``logits_to_keep=1``);
- a row that emits EOS leaves the batch at once (``batch_select_indices`` on the cache), so each
  step costs what the unfinished rows need. This measured about 2x one batched ``generate`` call.
Prompts are left-padded, position ids follow the attention mask. Sampling is seeded per call with
its own generator (same seed on CPU, same completions). Greedy when temperature is 0; nucleus
filtering when top_p < 1. With ``logprobs`` each sampled token's log-prob under the sampling
distribution (temperature applied) is returned. Stop strings are applied after decoding: the text
is cut before the first one and the token ids after the token that completes it (decoding does not
stop early at a stop string, only at EOS).
Models whose cache cannot be expanded or filtered fall back to ``model.generate``.
"""
from __future__ import annotations

import copy
import inspect
from typing import Optional, Sequence

import torch

from stagewise_pl.faults import fault_point
from stagewise_pl.progress import progress
from stagewise_pl.rollout import fast_decode
from stagewise_pl.rollout.base import ENGINES, RolloutBatch, SamplingParams


def sample_next(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator, with_logprobs: bool = True):
    """Next tokens (rows,) and, if asked, their log-probs under the sampling distribution (rows,)."""
    logits = logits.float()
    if sampling.temperature <= 0:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0] if with_logprobs else None
        return tokens, logp
    scaled = logits / sampling.temperature if sampling.temperature != 1.0 else logits
    if sampling.top_p < 1.0:
        sorted_logits, order = scaled.sort(-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, -1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    # inverse-CDF draw: one uniform per row (torch.multinomial costs ~10x more per step on CPU)
    probs = torch.softmax(scaled, -1)
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
    if not with_logprobs:
        return tokens, None
    # the drawn token's probability is positive (its cdf step is), so its log is finite; cheaper than a logsumexp
    return tokens, probs.gather(-1, tokens[:, None])[:, 0].log()


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's eos and every end token of the model's generation config
    (a chat model may list several: Llama 3.2 Instruct ends a turn with <|eot_id|>, <|eom_id|> or <|end_of_text|>),
    as vLLM stops on them."""
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(listed if isinstance(listed, (list, tuple)) else [listed])]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@ENGINES.register("hf")
class HFEngine:
    """Samples from ``model`` as it is at each :meth:`generate` call. ``dtype`` (None: the model's own) is the
    precision it samples in: the lean step (:mod:`fast_decode`) makes its bfloat16 weight copies from the model at
    every call; a model the lean step does not cover samples from a copy in ``dtype`` (``self.shadow``), whose
    weights are copied from the model at every call. Either way the copy is of the weights as they are then (after
    the last optimizer step), as the float32 engine samples from them."""

    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = False, fast_decode: bool = True,
                 dtype: Optional[torch.dtype] = None):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.fast_decode = fast_decode
        own = next(model.parameters()).dtype
        self.dtype = None if dtype in (None, own) else dtype
        if self.dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"HFEngine samples in float32 or bfloat16 (or the model's own dtype), not {dtype}")
        self.shadow = None  # the model in self.dtype, when the lean step does not cover it
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def sampler(self):
        """The module that samples: the model, or its copy in ``dtype`` (weights copied from the model now)."""
        if self.dtype is None or (self.fast_decode and fast_decode.supports(self.model) and
                                  fast_decode.folds(self.model, self.dtype)):
            return self.model  # the lean step copies the weights into its own dtype
        if self.shadow is None:
            self.shadow = copy.deepcopy(self.model).to(self.dtype).eval()
        for mine, theirs in zip(self.shadow.parameters(), self.model.parameters()):
            mine.copy_(theirs)
        return self.shadow

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling: SamplingParams, desc: str = "generate") -> RolloutBatch:
        """``prompts`` are rendered texts (chat template already applied). Sampling runs outside any autocast region
        (trainer.precision=bf16-mixed opens one around a phase's step): the engine computes in its own precision,
        ``dtype``, whatever the training's is."""
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, enabled=False):
            return self._generate(prompts, sampling, desc)

    def _generate(self, prompts: Sequence[str], sampling: SamplingParams, desc: str) -> RolloutBatch:
        was_training = self.model.training
        self.model.eval()
        sampler = self.sampler()
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
        out = RolloutBatch(n=sampling.n, prompt_ids=[], completion_ids=[], texts=[], finish_reasons=[],
                           logprobs=[] if sampling.logprobs else None)
        try:
            bar = progress(len(prompts), desc, enabled=self.progress)
            for start in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[start:start + self.batch_size])
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left",
                                     add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                for row in range(len(chunk)):
                    out.prompt_ids.append(enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist())
                ids, logps, reasons = self._decode(sampler, enc["input_ids"], enc["attention_mask"], sampling,
                                                   generator)
                for i, tokens in enumerate(ids):
                    text, kept, stopped = self._cut_at_stop(tokens, sampling)
                    out.completion_ids.append(tokens[:kept])
                    out.texts.append(text)
                    out.finish_reasons.append("stop" if stopped or reasons[i] == "stop" else "length")
                    if out.logprobs is not None:
                        out.logprobs.append(logps[i][:kept])
                bar.update(len(chunk))
            bar.close()
        finally:
            self.model.train(was_training)
        return out

    def _decode(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                generator: torch.Generator) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Token ids, log-probs and finish reasons of ``n`` completions per prompt row, prompt-major, sampled from
        ``model`` (the engine's model or its copy in ``dtype``)."""
        n = sampling.n
        stops = torch.tensor(stop_token_ids(model, self.tokenizer), dtype=torch.long, device=input_ids.device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        use_lean = self.fast_decode and fast_decode.supports(model)
        lean, cache = None, None

        def lean_decoder():  # built once it is known to be used (its weight copies and cache are not free)
            return fast_decode.FastDecoder(model, input_ids.shape[0] * n, input_ids.shape[1] + sampling.max_new_tokens,
                                           dtype=self.dtype)

        # float32 and bfloat16: the prompt through the lean step's own arithmetic
        if use_lean and fast_decode.folds(model, self.dtype):
            lean = lean_decoder()
            logits = lean.prefill(input_ids, attention_mask, positions, n)
        else:
            first = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1)
            cache = getattr(first, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_repeat_interleave") or \
                    not hasattr(cache, "batch_select_indices"):
                return self._decode_with_generate(model, input_ids, attention_mask, sampling, generator)
            if use_lean and hasattr(cache, "layers"):
                lean = lean_decoder()
                lean.load_prefill(cache, attention_mask, n)
                cache = None
            elif n > 1:
                cache.batch_repeat_interleave(n)
            logits = first.logits[:, -1]
        logits = logits.repeat_interleave(n, 0)  # (rows, V)
        mask = attention_mask.repeat_interleave(n, 0)
        position = positions[:, -1].repeat_interleave(n, 0)
        total = logits.shape[0]
        rows = torch.arange(total, device=logits.device)  # original row of each live row
        out_tokens = torch.full((total, sampling.max_new_tokens), -1, dtype=torch.long, device=logits.device)
        out_logp = torch.zeros((total, sampling.max_new_tokens), dtype=torch.float32,
                               device=logits.device) if sampling.logprobs else None
        stopped = torch.zeros(total, dtype=torch.bool, device=logits.device)
        for step in range(sampling.max_new_tokens):
            nxt, nxt_logp = sample_next(logits, sampling, generator, with_logprobs=sampling.logprobs)
            out_tokens[rows, step] = nxt
            if out_logp is not None:
                out_logp[rows, step] = nxt_logp
            finished = torch.isin(nxt, stops)
            done = int(finished.sum())  # one sync a step; the rest only when a row ends
            if done:
                stopped[rows[finished]] = True
            if step == sampling.max_new_tokens - 1 or done == len(nxt):
                break
            if done:  # finished rows leave the batch, cache included
                keep = (~finished).nonzero()[:, 0]
                if lean is not None:
                    lean.select(keep)
                else:
                    cache.batch_select_indices(keep)
                rows, nxt, mask, position = rows[keep], nxt[keep], mask[keep], position[keep]
            position = position + 1
            fault_point("decode")
            if lean is not None:
                logits = lean.step(nxt, position)
                continue
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            step_out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position[:, None],
                             use_cache=True, **{self._cache_kwarg: cache})
            logits = step_out.logits[:, -1]
        lengths = (out_tokens >= 0).sum(-1).tolist()
        tokens = [row[:length] for row, length in zip(out_tokens.tolist(), lengths)]
        logps = [row[:length] for row, length in zip(out_logp.tolist(), lengths)] if out_logp is not None else \
            [[] for _ in tokens]
        reasons = ["stop" if s else "length" for s in stopped.tolist()]
        return tokens, logps, reasons

    def _decode_with_generate(self, model, input_ids, attention_mask, sampling, generator):
        """Fallback for caches that cannot be expanded or filtered: plain ``model.generate``."""
        if sampling.logprobs:
            raise ValueError(f"{type(model).__name__}: its cache cannot be expanded or filtered, and the "
                             f"generate fallback returns no log-probs")
        greedy, stops = sampling.temperature <= 0, stop_token_ids(model, self.tokenizer)
        with torch.random.fork_rng(devices=[input_ids.device] if input_ids.is_cuda else []):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            seqs = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy, temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p, top_k=None if greedy else 0,
                num_return_sequences=sampling.n, eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id)
        tokens, reasons = [], []
        for seq in seqs[:, input_ids.shape[1]:].tolist():
            end = next((i for i, token in enumerate(seq) if token in stops), None)
            if end is not None:
                tokens.append(seq[:end + 1])
                reasons.append("stop")
            else:
                tokens.append(seq)
                reasons.append("length")
        return tokens, [[] for _ in tokens], reasons

    def _cut_at_stop(self, ids: list[int], sampling: SamplingParams) -> tuple[str, int, bool]:
        """Decoded text cut before the first stop string, how many tokens to keep (the shortest
        prefix whose text reaches the stop string: its tokens are part of the completion, its text
        not), and whether a stop string was found (then the finish reason is "stop", even when it
        was completed by the last token of the budget)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.index(stop) for stop in sampling.stop if stop in text]
        if not cuts:
            return text, len(ids), False
        for kept in range(1, len(ids) + 1):
            prefix = self.tokenizer.decode(ids[:kept], skip_special_tokens=True)
            if any(stop in prefix for stop in sampling.stop):
                return text[:min(cuts)], kept, True
        return text[:min(cuts)], len(ids), True
