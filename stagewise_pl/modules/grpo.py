"""GRPO: sample a group of completions per prompt, grade them, update with the clipped surrogate.

One Lightning training step is one *rollout step*:

1. the step's prompts (a batch from the loader) get ``num_generations`` completions each from the
   rollout engine, and the verifier grades them;
2. with dynamic sampling, fresh prompts are drawn and sampled until the batch holds
   ``prompts_per_step`` informative groups (rewards not all equal), at most ``max_extra_rounds``
   more rounds;
3. every graded completion becomes a :class:`~stagewise_pl.records.RolloutRecord` for the sink
   (the ledger; until it exists, the JSONL of all-zero groups);
4. advantages per group (:mod:`stagewise_pl.advantages`); groups with no signal are left out
   when ``drop_flat_groups``;
5. ``num_iterations`` passes over the kept completions, each split into ``minibatches`` optimizer
   steps, each mini-batch into micro-batches whose gradients accumulate. The loss is
   :func:`stagewise_pl.kernels.fused_policy_loss` on the decoder's hidden states (no logits
   tensor); the aggregation weights are computed over the whole mini-batch, so splitting it into
   micro-batches does not change the gradient. With one pass and one mini-batch the update is
   on-policy (old log-probs = current ones, no extra forward); otherwise the old log-probs are
   computed once, before the first update. With ``beta > 0`` a frozen copy of the policy taken at
   the start of the phase gives reference log-probs for the k3 KL term.

Optimisation is manual (Lightning's ``automatic_optimization = False``): Lightning's
``global_step`` counts optimizer steps; the module counts rollout steps itself and stores that
count, the sampling position and everything else it needs in the checkpoint.
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch

from stagewise_pl import dist
from stagewise_pl.advantages import compute_advantages, group_stats
from stagewise_pl.data.problems import Problem
from stagewise_pl.data.sft import additive_mask
from stagewise_pl.faults import poisoned
from stagewise_pl.kernels import fused_policy_loss, logprobs
from stagewise_pl.losses import PolicyLossConfig, aggregation_weights, entropy_weights
from stagewise_pl.models.load import render_prompt
from stagewise_pl.nonfinite import NonFiniteGuard
from stagewise_pl.modules.sft import adamw_with_schedule
from stagewise_pl.records import NullSink, RolloutRecord, RolloutSink
from stagewise_pl.rollout.base import SamplingParams


PACK_LIMIT = 1024  # longest packed prompt + completions sequence (its dense block mask is PACK_LIMIT^2)


@dataclass
class GRPOSettings:
    """Everything a GRPO phase needs besides the model: see ``GRPOConfig`` in the config for the meaning."""

    prompts_per_step: int = 16
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "grpo"
    std_scale: str = "default"
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    mask_truncated: bool = False
    num_iterations: int = 1
    minibatches: int = 1
    micro_batch_size: int = 0
    drop_flat_groups: bool = True
    dynamic_sampling: bool = False
    max_extra_rounds: int = 2

    @classmethod
    def from_config(cls, g, max_new_tokens: int) -> "GRPOSettings":
        loss = PolicyLossConfig(epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                                aggregation=g.loss_aggregation, max_tokens=max_new_tokens, beta=g.beta,
                                entropy_coef=g.entropy_coef)
        return cls(prompts_per_step=g.prompts_per_step, num_generations=g.num_generations,
                   max_new_tokens=max_new_tokens, temperature=g.temperature, top_p=g.top_p, advantage=g.advantage,
                   std_scale=g.std_scale, loss=loss, mask_truncated=g.mask_truncated,
                   num_iterations=g.num_iterations, minibatches=g.minibatches, micro_batch_size=g.micro_batch_size,
                   drop_flat_groups=g.drop_flat_groups, dynamic_sampling=g.dynamic_sampling,
                   max_extra_rounds=g.max_extra_rounds)

    @property
    def updates_per_step(self) -> int:
        return self.num_iterations * self.minibatches


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


def _cache_kwarg(module) -> str:
    """The name a decoder's forward takes its key/value cache under (newer transformers: ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def informative(rewards: torch.Tensor) -> list[int]:
    """Indices of groups whose rewards are not all equal."""
    return (rewards.max(-1).values > rewards.min(-1).values).nonzero()[:, 0].tolist()


class GRPOModule(L.LightningModule):
    def __init__(self, policy, tokenizer, engine, verifier, problems: Sequence[Problem], settings: GRPOSettings,
                 lr: float, total_steps: int, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.98),
                 warmup_steps: int = 0, min_lr_ratio: float = 1.0, grad_clip: float = 1.0, seed: int = 0,
                 sink: Optional[RolloutSink] = None, phase_name: str = "grpo", kernel_backend: str = "auto",
                 shared_prefix: bool = True, phase_index: int = 0, max_nonfinite_steps: int = 3):
        super().__init__()
        self.policy, self.tokenizer, self.engine, self.verifier = policy, tokenizer, engine, verifier
        self.problems, self.s = list(problems), settings
        self.lr, self.total_steps, self.weight_decay, self.betas = lr, total_steps, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio, self.grad_clip = warmup_steps, min_lr_ratio, grad_clip
        self.seed, self.sink, self.phase_name = seed, sink if sink is not None else NullSink(), phase_name
        self.kernel_backend = kernel_backend
        self.shared_prefix, self.phase_index = shared_prefix, phase_index
        self.log_prefix = f"{phase_name}/"
        self.automatic_optimization = False
        self.rollout_steps = 0  # rollout steps done (the loader's position)
        self.update_steps = 0  # rollout steps that made an update
        self.optimizer_steps = 0
        self.history: list[dict] = []  # per rollout step metrics, for callers and tests
        # updates made / the update the rollout engine's weights are from (the phase starts in sync: the run
        # pushes the policy when it hands out the engine)
        self._weights_version = self._engine_version = 0
        self._frozen: dict = {}  # the KL reference: a plain dict, so it is no submodule (not trained, not saved twice)
        self._prompt_cache: dict[str, str] = {}
        self.guard = NonFiniteGuard(max_nonfinite_steps, phase_name)
        self.nonfinite_rewards = 0  # rewards a verifier gave as NaN/inf, counted as 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def reference(self):
        return self._frozen.get("reference")

    def on_fit_start(self) -> None:
        self.policy.train()
        if self.s.loss.beta > 0 and self.reference is None:  # the policy as the phase starts
            self._frozen["reference"] = copy.deepcopy(self.policy).eval().requires_grad_(False)

    def on_train_start(self) -> None:
        # records written after the checkpoint we resumed from are about to be made again
        if dist.is_main():
            self.sink.rewind(self.phase_name, self.rollout_steps)
        dist.barrier()
        if self.rollout_steps:  # resumed: the checkpoint's weights came after the engine got its copy
            self._engine_version = -1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grpo"] = {"rollout_steps": self.rollout_steps, "update_steps": self.update_steps,
                              "optimizer_steps": self.optimizer_steps, "nonfinite": self.guard.state_dict(),
                              "nonfinite_rewards": self.nonfinite_rewards}
        if self.reference is not None:
            checkpoint["grpo"]["reference"] = self.reference.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("grpo", {})
        self.rollout_steps = state.get("rollout_steps", 0)
        self.update_steps = state.get("update_steps", 0)
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.guard.load_state_dict(state.get("nonfinite", {}))
        self.nonfinite_rewards = state.get("nonfinite_rewards", 0)
        if "reference" in state:
            reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
            reference.load_state_dict(state["reference"])
            self._frozen["reference"] = reference

    # ------------------------------------------------------------------ rollouts
    def _prompt(self, problem: Problem) -> str:
        if problem.id not in self._prompt_cache:
            self._prompt_cache[problem.id] = render_prompt(self.tokenizer, problem.prompt)
        return self._prompt_cache[problem.id]

    def _sample_and_grade(self, problems: list[Problem], round_: int) -> tuple[Groups, float, float]:
        s = self.s
        seed = int(np.random.default_rng([self.seed, self.rollout_steps, round_]).integers(2**31 - 1))
        sampling = SamplingParams(n=s.num_generations, temperature=s.temperature, top_p=s.top_p,
                                  max_new_tokens=s.max_new_tokens, seed=seed)
        if hasattr(self.engine, "sync_weights") and self._engine_version != self._weights_version:
            self.engine.sync_weights(self.policy)  # an engine with its own copy samples from the updated policy
            self._engine_version = self._weights_version
        t0 = time.perf_counter()
        batch = self.engine.generate([self._prompt(p) for p in problems], sampling, desc="grpo rollouts")
        t1 = time.perf_counter()
        golds = [p.answer for p in problems for _ in range(s.num_generations)]
        verdicts = self.verifier.score_batch(batch.texts, golds)
        t2 = time.perf_counter()
        rewards = []
        for v in verdicts:
            r = float(v.reward)
            if not math.isfinite(r):  # a verifier's NaN/inf: 0, and counted
                self.nonfinite_rewards += 1
                r = 0.0
            rewards.append(r)
        groups = Groups(list(problems), batch.prompt_ids, batch.completion_ids, batch.texts,
                        [f == "length" for f in batch.finish_reasons],
                        torch.tensor(rewards, dtype=torch.float32).view(len(problems), s.num_generations),
                        [v.reason for v in verdicts], [round_] * len(problems))
        return groups, t1 - t0, t2 - t1

    def _extra_problems(self, round_: int, count: int) -> list[Problem]:
        """Fresh prompts for dynamic sampling: a seeded draw, a pure function of (seed, step, round)."""
        rng = np.random.default_rng([self.seed, self.rollout_steps, round_, 7])
        return [self.problems[i] for i in rng.choice(len(self.problems), size=min(count, len(self.problems)),
                                                     replace=False)]

    def _sample_and_grade_all(self, problems: list[Problem], round_: int) -> tuple[Groups, float, float]:
        """Several ranks: each samples and grades its share of ``problems``, then every rank gets all groups."""
        if dist.world_size() == 1:
            return self._sample_and_grade(problems, round_)
        mine = dist.shard(problems)
        if mine:
            groups, gen_s, grade_s = self._sample_and_grade(mine, round_)
        else:
            groups, gen_s, grade_s = None, 0.0, 0.0
        parts = [g for g in dist.gather(groups) if g is not None]
        return Groups.concat(parts), gen_s, grade_s

    def _records(self, groups: Groups) -> list[RolloutRecord]:
        g = self.s.num_generations
        out = []
        for i, problem in enumerate(groups.problems):
            zero = bool((groups.rewards[i] <= 0).all())
            for j in range(g):
                r = i * g + j
                reward = float(groups.rewards[i, j])
                out.append(RolloutRecord(self.phase_name, "grpo", self.rollout_steps, problem.id, j, reward,
                                         groups.reasons[r], len(groups.completion_ids[r]), groups.truncated[r], zero,
                                         groups.texts[r] if reward <= 0 else None, groups.rounds[i],
                                         self.phase_index, self.global_step))
        return out

    # ------------------------------------------------------------------ tensors
    def _tensors(self, groups: Groups, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """Left-padded prompts + right-padded completions as one (N, Lp + Lc) batch."""
        device = self.device
        pad = self.tokenizer.pad_token_id
        n = len(groups.completion_ids)
        lp = max(len(x) for x in groups.prompt_ids)
        lc = max(1, max(len(x) for x in groups.completion_ids))
        ids = torch.full((n, lp + lc), pad, dtype=torch.long)
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
        if self.s.mask_truncated:
            mask[torch.tensor(groups.truncated, dtype=torch.bool)] = 0.0
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": positions.to(device),
                "targets": ids[:, lp:].to(device), "mask": mask.to(device), "prompt_len": lp,
                "prompt_index": torch.arange(n, device=device) // g,
                "prompt_lens": torch.tensor([len(groups.prompt_ids[r // g]) for r in range(n)], device=device),
                "completion_lens": torch.tensor([len(c) for c in groups.completion_ids], device=device),
                "advantages": advantages.reshape(-1).to(device)}

    def _hidden(self, model, t: dict, rows) -> torch.Tensor:
        """Hidden states that predict the completion tokens of ``rows``: (R, Lc, H).

        When the rows share prompts (a group's G samples), each distinct prompt is computed once
        (``shared_prefix``): its rows' completions are packed after it in one sequence, each
        completion seeing the prompt and itself only (a block mask), when that sequence is at most
        ``PACK_LIMIT`` tokens; otherwise the prompt's key/value cache is gathered to its rows and
        the completions run as a batch. Either way the gradient flows through the shared prompt
        computation exactly as through G copies (tested). Without sharing, one forward pass over
        prompt + completion per row.
        """
        decoder = getattr(model, model.base_model_prefix)
        lp, lc = t["prompt_len"], t["targets"].shape[1]
        prompts, inverse = torch.unique(t["prompt_index"][rows], return_inverse=True)
        if self.shared_prefix and len(prompts) * 2 <= len(rows):
            packed = self._packed_hidden(decoder, t, rows, inverse, len(prompts))
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

    def _packed_hidden(self, decoder, t: dict, rows: torch.Tensor, inverse: torch.Tensor, n_prompts: int):
        """One sequence per distinct prompt: the prompt, then each of its rows' completions; None when
        the longest such sequence exceeds PACK_LIMIT tokens."""
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
        ids = torch.full((n_prompts, width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
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
        if getattr(self.policy.config, "_attn_implementation", "sdpa") != "sdpa":
            mask = additive_mask(mask, self.policy.dtype)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return out.reshape(n_prompts * width, -1)[gather]

    @torch.no_grad()
    def _logprobs(self, model, t: dict) -> torch.Tensor:
        head = model.get_output_embeddings()
        out = []
        all_rows = torch.arange(t["targets"].shape[0], device=self.device)
        for part in self._micro_slices(len(all_rows)):
            rows = all_rows[part]
            targets = torch.where(t["mask"][rows].bool(), t["targets"][rows], torch.full_like(t["targets"][rows], -100))
            logp, _ = logprobs(self._hidden(model, t, rows), head.weight, targets, getattr(head, "bias", None),
                               temperature=self.s.temperature, backend=self.kernel_backend)
            out.append(logp)
        return torch.cat(out)

    def _micro_slices(self, n: int) -> list[slice]:
        """Consecutive micro-batches of ``n`` rows (``micro_batch_size``; 0 = one)."""
        size = self.s.micro_batch_size or n
        return [slice(i, i + size) for i in range(0, n, size)]

    def _my_micro_slices(self, n: int) -> list[Optional[slice]]:
        """This rank's micro-batches of a mini-batch of ``n`` rows. Every rank gets the same number (None =
        a rank with nothing left makes an empty backward, so the gradient all-reduce stays in step)."""
        world = dist.world_size()
        if world == 1:
            return self._micro_slices(n)
        if self.s.micro_batch_size:
            parts = self._micro_slices(n)
        else:
            bounds = [round(i * n / world) for i in range(world + 1)]
            parts = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        mine: list[Optional[slice]] = list(parts[dist.rank()::world])
        return mine + [None] * (-(-len(parts) // world) - len(mine))

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: list[int], batch_idx: int):
        s = self.s
        step_started = time.perf_counter()
        problems = [self.problems[i] for i in batch]
        groups, gen_s, grade_s = self._sample_and_grade_all(problems, 0)
        parts, rounds = [groups], 1
        if s.dynamic_sampling:
            kept = len(informative(groups.rewards))
            while kept < s.prompts_per_step and rounds <= s.max_extra_rounds:
                extra, g_s, r_s = self._sample_and_grade_all(self._extra_problems(rounds, s.prompts_per_step), rounds)
                parts.append(extra)
                kept += len(informative(extra.rewards))
                gen_s, grade_s, rounds = gen_s + g_s, grade_s + r_s, rounds + 1
        all_groups = Groups.concat(parts)
        if dist.is_main():  # every rank holds all groups; one writes them
            self.sink.record(self._records(all_groups))

        rewards = all_groups.rewards
        keep = informative(rewards) if s.drop_flat_groups else list(range(len(all_groups.problems)))
        if s.dynamic_sampling:
            keep = keep[:s.prompts_per_step]
        train_s, stats = 0.0, {}
        if keep:
            t0 = time.perf_counter()
            selected = all_groups.select(keep)
            advantages = compute_advantages(selected.rewards, s.advantage, s.std_scale)
            stats = self._update(selected, advantages)
            train_s = time.perf_counter() - t0
            self.update_steps += 1
        self.rollout_steps += 1
        lengths = torch.tensor([len(c) for c in all_groups.completion_ids], dtype=torch.float32)
        metrics = {
            "reward": float(rewards.mean()),
            "pass_rate": sum(r == "correct" for r in all_groups.reasons) / max(1, len(all_groups.reasons)),
            **group_stats(rewards),
            "informative_groups": float(len(informative(rewards))),
            "nonfinite_skipped": float(self.guard.skipped), "nonfinite_rewards": float(self.nonfinite_rewards + getattr(self.verifier, "nonfinite", 0)),
            "groups_trained": float(len(keep)),
            "rounds": float(rounds),
            "completion_len": float(lengths.mean()),
            "prompts": float(len(problems)), "rollouts": float(len(lengths)), "generated_tokens": float(lengths.sum()),
            "truncated": sum(all_groups.truncated) / max(1, len(all_groups.truncated)),
            "s_generation": gen_s, "s_grading": grade_s, "s_training": train_s,
            "s_step": time.perf_counter() - step_started,
            "updated": float(bool(keep)),
            **stats,
        }
        self.history.append(metrics)
        # every metric of every rollout step straight to the loggers (one call, not one self.log per metric:
        # those cost about a millisecond each); the reward also goes to the progress bar
        row = {f"{self.log_prefix}train/{name}": float(value) for name, value in metrics.items()}
        row[f"{self.log_prefix}train/rollout_step"] = float(self.rollout_steps)
        for logger in self.loggers:
            logger.log_metrics(row, step=self.global_step)
        if self.trainer.progress_bar_callback is not None:  # self.log costs milliseconds: only for the bar
            self.log(f"{self.log_prefix}train/reward", metrics["reward"], prog_bar=True, logger=False, batch_size=1)

    def _update(self, groups: Groups, advantages: torch.Tensor) -> dict[str, float]:
        s = self.s
        t = self._tensors(groups, advantages)
        n = t["targets"].shape[0]
        head = self.policy.get_output_embeddings()
        old = None
        if s.num_iterations > 1 or s.minibatches > 1:
            old = self._logprobs(self.policy, t)  # before any update of this step
        ref = self._logprobs(self.reference.to(self.device), t) if s.loss.beta > 0 else None
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.rollout_steps, 99]).integers(2**31)))
        sums = {"loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, "kl": 0.0}
        count = 0
        for iteration in range(s.num_iterations):
            order = torch.randperm(n, generator=gen) if s.minibatches > 1 else torch.arange(n)
            for mb in torch.tensor_split(order.to(self.device), s.minibatches):
                if len(mb) == 0:
                    continue
                weights = aggregation_weights(t["mask"][mb], s.loss)  # over the whole mini-batch
                ent_weights = entropy_weights(t["mask"][mb])
                tokens = t["mask"][mb].sum().clamp(min=1)
                poison = poisoned(f"nan_loss:{self.phase_name}:{self.rollout_steps + 1}")
                mb_loss = 0.0
                for part in self._my_micro_slices(len(mb)):
                    if part is None:
                        self.manual_backward(sum(p.sum() for p in self.policy.parameters()) * 0.0)
                        continue
                    rows = mb[part]
                    out = fused_policy_loss(
                        self._hidden(self.policy, t, rows), head.weight, t["targets"][rows],
                        None if old is None else old[rows], t["advantages"][rows], t["mask"][rows], s.loss,
                        ref_logp=None if ref is None else ref[rows], bias=getattr(head, "bias", None),
                        temperature=s.temperature, with_entropy=True, weights=weights[part],
                        entropy_weight=ent_weights[part],
                        backend=self.kernel_backend)
                    loss = out.loss * float("nan") if poison else out.loss
                    # several ranks: each holds a part of the mini-batch's loss, and DDP averages the gradients
                    self.manual_backward(loss * dist.world_size())
                    value = float(loss.detach())  # one device sync for the guard and the metric
                    mb_loss += value
                    m = t["mask"][rows]
                    sums["loss"] += value
                    sums["clip_fraction"] += float(out.clip_fraction * m.sum() / tokens)
                    sums["entropy"] += float((out.entropy * m).sum() / tokens)
                    if ref is not None:
                        d = ref[rows] - out.logp
                        sums["kl"] += float(((torch.exp(d) - d - 1) * m).sum().detach() / tokens)
                if not self.guard.ok(mb_loss, self.policy.parameters(), self.rollout_steps + 1):
                    optimizer.zero_grad(set_to_none=True)  # NaN/inf: this mini-batch makes no update
                    scheduler.step()
                    continue
                if self.grad_clip:
                    self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                optimizer.step()
                self._weights_version += 1
                self.optimizer_steps += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                count += 1
        if dist.world_size() > 1:
            sums = {k: sum(d[k] for d in dist.gather(sums)) for k in sums}
        stats = {k: v / max(1, count) for k, v in sums.items()}
        if ref is None:
            stats.pop("kl")
        stats["lr"] = float(scheduler.get_last_lr()[0])
        stats["advantage_abs"] = float(advantages.abs().mean())
        return stats

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        per_step = self.s.updates_per_step  # the schedule counts optimizer steps
        return adamw_with_schedule(self.policy, self.lr, self.betas, self.weight_decay, self.warmup_steps * per_step,
                                   self.total_steps * per_step, self.min_lr_ratio)
