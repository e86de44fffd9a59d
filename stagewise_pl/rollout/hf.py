"""HFEngine: batched ``transformers`` generate with a KV cache and left padding (CPU and GPU).

Each prompt is encoded once and expanded to ``n`` samples inside ``generate``
(``num_return_sequences``). Completions are cut at EOS or at the first stop string; a completion
that hit ``max_new_tokens`` is marked ``length``. Sampling is seeded per call, so the same seed on
CPU gives the same completions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from stagewise_pl.rollout.base import ENGINES, RolloutBatch, SamplingParams


@ENGINES.register("hf")
class HFEngine:
    def __init__(self, model, tokenizer, batch_size: int = 64, progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling: SamplingParams, desc: str = "generate") -> RolloutBatch:
        """``prompts`` are rendered texts (chat template already applied)."""
        tok, model = self.tokenizer, self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        eos = tok.eos_token_id
        out = RolloutBatch(n=sampling.n, prompt_ids=[], completion_ids=[], texts=[], finish_reasons=[])
        greedy = sampling.temperature <= 0
        starts = range(0, len(prompts), self.batch_size)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            for start in tqdm(starts, desc=desc, disable=not self.progress, leave=False):
                chunk = list(prompts[start:start + self.batch_size])
                enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                generated = model.generate(
                    **enc, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                    top_k=None if greedy else 0, num_return_sequences=sampling.n, eos_token_id=eos,
                    pad_token_id=tok.pad_token_id, return_dict_in_generate=False)
                width = enc["input_ids"].shape[1]
                for row, seq in enumerate(generated.tolist()):
                    prompt_row = enc["input_ids"][row // sampling.n]
                    prompt_mask = enc["attention_mask"][row // sampling.n]
                    if row % sampling.n == 0:
                        out.prompt_ids.append(prompt_row[prompt_mask.bool()].tolist())
                    ids, reason = self._cut(seq[width:], eos, sampling)
                    text, stopped = self._text(ids, sampling)
                    out.completion_ids.append(ids)
                    out.texts.append(text)
                    out.finish_reasons.append("stop" if stopped else reason)
        model.train(was_training)
        return out

    def _cut(self, ids: list[int], eos: int, sampling: SamplingParams) -> tuple[list[int], str]:
        if eos in ids:
            return ids[:ids.index(eos) + 1], "stop"
        pad = self.tokenizer.pad_token_id
        while ids and ids[-1] == pad and pad != eos:
            ids = ids[:-1]
        return ids, "length" if len(ids) >= sampling.max_new_tokens else "stop"

    def _text(self, ids: list[int], sampling: SamplingParams) -> tuple[str, bool]:
        """Decoded text cut before the first stop string, and whether a stop string was found."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.index(stop) for stop in sampling.stop if stop in text]
        return (text[:min(cuts)], True) if cuts else (text, False)
