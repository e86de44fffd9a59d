"""Bridge: teacher traces made learnable for the student before SFT.

Reconstruction (the paper's body was not available; after SDFT's "self-distillation bridges the
distribution gap"): a teacher trace is correct but written in a distribution the student is far
from; training on a target the student itself could have written -- still correct, still guided by
the teacher -- moves it less and teaches more. Strategies are plug-ins registered in :data:`BRIDGES`
(``bridge.strategy``; a dotted path names a user's):

- ``student_rewrite`` (default): the student sees the problem and the teacher trace as a reference
  (``bridge_rewrite`` template in conf/prompts) and writes its own solution; kept if the verifier
  accepts it and it does not mention the reference (``bridge.reference_markers``), else the raw trace.
- ``teacher_simplify``: the teacher rewrites its trace into short steps at the student's granularity;
  kept if it verifies.
- ``prefix_hint``: the student completes the first ``bridge.prefix_fraction`` of the trace's lines;
  kept if the whole verifies.
- ``min_nll_select``: among ``bridge.candidates`` teacher traces, the verified one with the lowest
  student NLL.
- ``raw``: the teacher trace as is (the baseline Bridge is measured against).

With ``bridge.fallback=drop`` a problem with no kept candidate is left out instead of trained on raw.

Every candidate is graded; rejected ones are counted by reason (``empty``, ``no_answer``, ``wrong``,
``mentions_reference``, ``teacher_failed``). A raw trace that does not verify is never trained on: its
problem is dropped unless the strategy found a verified target. The student's mean token NLL of the
raw and the final targets (given the plain prompt, as SFT sees it) is measured before training.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from stagewise_pl.data.problems import Problem
from stagewise_pl.registry import Registry

BRIDGES: Registry = Registry("bridge strategy")
ACCEPTED = "accepted"


@dataclass
class BridgeItem:
    """One problem's outcome: ``target`` is what SFT learns (None: dropped), ``kept`` says it is bridged."""

    problem_id: str
    raw: str
    target: Optional[str]
    kept: bool
    reason: str  # 'accepted', or why the bridged candidate was rejected
    nll_raw: float = math.nan
    nll_target: float = math.nan


def mentions(text: str, markers: Sequence[str]) -> bool:
    low = text.lower()
    return any(m.lower() in low for m in markers)


class BridgeContext:
    """What strategies work with: the student (policy, tokenizer, rollout engine), the verifier, the teacher,
    the prompt templates and the ``bridge`` settings. ``counts`` gathers every judged candidate's reason."""

    def __init__(self, policy, tokenizer, engine, verifier, teacher, prompts: dict, settings, max_new_tokens: int,
                 seed: int = 0, max_length: int = 1024, batch_size: int = 32, kernel: str = "auto",
                 progress: bool = False, render: Optional[Callable[[str], str]] = None):
        from stagewise_pl.models.load import PromptRenderer

        self.policy, self.tokenizer, self.engine, self.verifier = policy, tokenizer, engine, verifier
        self._render = render or PromptRenderer(tokenizer)  # the run's renderer (chat template, system prompt)
        self.teacher, self.prompts, self.s = teacher, prompts, settings
        self.max_new_tokens, self.seed, self.max_length = max_new_tokens, seed, max_length
        self.batch_size, self.kernel, self.progress = batch_size, kernel, progress
        self.counts: Counter = Counter()
        self.generated_tokens = 0  # what the student sampled here (a run's generation budget counts it)
        self.teacher_texts = 0  # what the teacher (or critic) wrote here: traces, simplifications, critiques, repairs
        self._nll: dict[tuple[str, str], float] = {}  # (problem id, target) -> NLL: nothing is scored twice

    def render(self, text: str) -> str:
        return self._render(text)

    def template(self, key: str, **fields) -> str:
        if key not in self.prompts:
            from stagewise_pl.config import ConfigError

            raise ConfigError(f"prompts: no template {key!r} (the prompt file needs it for this strategy)")
        return self.prompts[key].format(**fields)

    def sample(self, rendered: Sequence[str], n: int, desc: str):
        from stagewise_pl.rollout.base import SamplingParams

        params = SamplingParams(n=n, temperature=self.s.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)
        batch = self.engine.generate(list(rendered), params, desc=desc)
        self.generated_tokens += sum(len(ids) for ids in batch.completion_ids)
        return batch

    def judge(self, texts: Sequence[Optional[str]], golds: Sequence[str], reference_check: bool = False,
              count: bool = True) -> list[str]:
        """'accepted' or the reason a candidate is not kept; counted in ``counts`` unless ``count`` is False."""
        reasons: list[Optional[str]] = [None] * len(texts)
        to_grade = [i for i, t in enumerate(texts) if t is not None and t.strip()]
        for i, t in enumerate(texts):
            if t is None:
                reasons[i] = "teacher_failed"
            elif not t.strip():
                reasons[i] = "empty"
        verdicts = self.verifier.score_batch([texts[i] for i in to_grade], [golds[i] for i in to_grade])
        for i, v in zip(to_grade, verdicts):
            if v.reason != "correct":
                reasons[i] = "no_answer" if v.reason == "no_answer" else "wrong"
            elif reference_check and mentions(texts[i], self.s.reference_markers):
                reasons[i] = "mentions_reference"
            else:
                reasons[i] = ACCEPTED
        if count:
            self.counts.update(reasons)
        return reasons  # type: ignore[return-value]

    def nll(self, problems: Sequence[Problem], targets: Sequence[str]) -> list[float]:
        """The student's mean token NLL of each target (and EOS) after the plain rendered prompt (the policy
        does not change while a bridge runs, so each (problem, target) is scored once)."""
        todo = list(dict.fromkeys((p.id, t) for p, t in zip(problems, targets) if (p.id, t) not in self._nll))
        by_id = {p.id: p for p in problems}
        self._nll.update(zip(todo, self._score([by_id[i] for i, _ in todo], [t for _, t in todo])))
        return [self._nll[(p.id, t)] for p, t in zip(problems, targets)]

    @torch.no_grad()
    def _score(self, problems: Sequence[Problem], targets: Sequence[str]) -> list[float]:
        from stagewise_pl.data.sft import encode_example, pad_collate
        from stagewise_pl.kernels import logprobs
        from stagewise_pl.losses import IGNORE_INDEX, shift_labels
        from stagewise_pl.models.forward import hidden_states

        policy = self.policy
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        head = policy.get_output_embeddings()
        out: list[float] = []
        try:
            for start in range(0, len(targets), self.batch_size):
                part = slice(start, start + self.batch_size)
                examples = [encode_example(self.tokenizer, self.render(p.prompt), t, self.max_length)
                            for p, t in zip(problems[part], targets[part])]
                batch = {k: v.to(device) for k, v in pad_collate(examples, self.tokenizer.pad_token_id).items()}
                labels = shift_labels(batch["labels"])
                logp, _ = logprobs(hidden_states(policy, batch), head.weight, labels, getattr(head, "bias", None),
                                   backend=self.kernel)
                mask = (labels != IGNORE_INDEX).float()
                out += (-(logp.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        finally:
            policy.train(was_training)
        return out


class BridgeStrategy:
    """Proposes, for each problem, a bridged target and whether it is kept.

    ``propose`` gets the teacher traces (``traces_needed(settings)`` per problem, the first is the raw trace) and
    returns one ``(candidate, reason)`` per problem: reason 'accepted' keeps the candidate.
    """

    name = ""

    def traces_needed(self, settings) -> int:
        return 1

    def propose(self, ctx: BridgeContext, problems: Sequence[Problem],
                traces: Sequence[Sequence[str]]) -> list[tuple[Optional[str], str]]:
        raise NotImplementedError


@BRIDGES.register("raw")
class Raw(BridgeStrategy):
    name = "raw"

    def propose(self, ctx, problems, traces):
        return [(None, "raw") for _ in problems]


@BRIDGES.register("student_rewrite")
class StudentRewrite(BridgeStrategy):
    name = "student_rewrite"

    def propose(self, ctx, problems, traces):
        n = ctx.s.samples
        rendered = [ctx.render(ctx.template("bridge_rewrite", problem=p.prompt, reference=t[0]))
                    for p, t in zip(problems, traces)]
        batch = ctx.sample(rendered, n, desc="bridge: student rewrites")
        reasons = ctx.judge(batch.texts, [p.answer for p in problems for _ in range(n)], reference_check=True)
        return [first_accepted([(batch.texts[r], reasons[r]) for r in batch.samples_of(i)])
                for i in range(len(problems))]


@BRIDGES.register("teacher_simplify")
class TeacherSimplify(BridgeStrategy):
    name = "teacher_simplify"

    def propose(self, ctx, problems, traces):
        from stagewise_pl.teachers.base import TeacherError, ask_each

        if not hasattr(ctx.teacher, "simplify"):
            raise TeacherError(f"bridge.strategy=teacher_simplify: teacher {type(ctx.teacher).__name__} "
                               "cannot simplify")
        texts = ask_each(ctx.teacher, "simplify", [(p, t[0]) for p, t in zip(problems, traces)])
        ctx.teacher_texts += written(texts)
        reasons = ctx.judge(texts, [p.answer for p in problems])
        return list(zip(texts, reasons))


@BRIDGES.register("prefix_hint")
class PrefixHint(BridgeStrategy):
    name = "prefix_hint"

    @staticmethod
    def prefix(trace: str, fraction: float) -> str:
        """The first ``fraction`` of the trace's lines, never its last line (where the answer stands)."""
        lines = trace.strip().splitlines()
        keep = int(fraction * (len(lines) - 1))
        return "".join(line + "\n" for line in lines[:keep])

    def propose(self, ctx, problems, traces):
        n = ctx.s.samples
        prefixes = [self.prefix(t[0], ctx.s.prefix_fraction) for t in traces]
        batch = ctx.sample([ctx.render(p.prompt) + pre for p, pre in zip(problems, prefixes)], n,
                           desc="bridge: student completes prefixes")
        texts = [prefixes[i // n] + batch.texts[i] for i in range(len(batch.texts))]
        reasons = ctx.judge(texts, [p.answer for p in problems for _ in range(n)])
        return [first_accepted([(texts[r], reasons[r]) for r in batch.samples_of(i)]) for i in range(len(problems))]


@BRIDGES.register("min_nll_select")
class MinNLLSelect(BridgeStrategy):
    name = "min_nll_select"

    def traces_needed(self, settings) -> int:
        return settings.candidates

    def propose(self, ctx, problems, traces):
        flat = [(i, t) for i, ts in enumerate(traces) for t in ts]
        reasons = ctx.judge([t for _, t in flat], [problems[i].answer for i, _ in flat])
        ok = [(i, t) for (i, t), r in zip(flat, reasons) if r == ACCEPTED]
        nlls = ctx.nll([problems[i] for i, _ in ok], [t for _, t in ok])
        best: dict[int, tuple[float, str]] = {}
        for (i, t), v in zip(ok, nlls):
            if i not in best or v < best[i][0]:
                best[i] = (v, t)
        return [(best[i][1], ACCEPTED) if i in best else (None, "no_verified_candidate") for i in range(len(problems))]


def first_accepted(candidates: Sequence[tuple[str, str]]) -> tuple[Optional[str], str]:
    """The first accepted candidate, else (None, the most common reason of rejection)."""
    for text, reason in candidates:
        if reason == ACCEPTED:
            return text, ACCEPTED
    return None, Counter(r for _, r in candidates).most_common(1)[0][0] if candidates else "empty"


def make_strategy(settings) -> BridgeStrategy:
    return BRIDGES.get(settings.strategy)()


def run_bridge(strategy: BridgeStrategy, ctx: BridgeContext,
               problems: Sequence[Problem]) -> tuple[list[BridgeItem], dict]:
    """Bridged targets for ``problems`` (keep-or-fall-back) and a summary: acceptance and NLL bridged vs raw."""
    from stagewise_pl.teachers.base import TeacherError

    problems = list(problems)
    if not problems:
        return [], summarize(strategy.name, [], ctx.counts)
    traces = ctx.teacher.traces(problems, n=strategy.traces_needed(ctx.s))
    ctx.teacher_texts += written(traces)
    have = [i for i, t in enumerate(traces) if t]
    missing = len(problems) - len(have)
    if not have:
        raise TeacherError(f"the teacher gave no trace for any of {len(problems)} problems")
    problems, traces = [problems[i] for i in have], [traces[i] for i in have]
    raw_ok = ctx.judge([t[0] for t in traces], [p.answer for p in problems], count=False)  # reported apart
    proposals = strategy.propose(ctx, problems, traces)
    items = []
    for p, t, raw_reason, (candidate, reason) in zip(problems, traces, raw_ok, proposals):
        if reason == ACCEPTED:
            items.append(BridgeItem(p.id, t[0], candidate, True, reason))
        else:
            fallback = t[0] if raw_reason == ACCEPTED and ctx.s.fallback == "raw" else None
            items.append(BridgeItem(p.id, t[0], fallback, False, reason))
    scored = [(p, it) for p, it in zip(problems, items) if it.target is not None]
    raw_nll = ctx.nll([p for p, _ in scored], [it.raw for _, it in scored])
    target_nll = ctx.nll([p for p, _ in scored], [it.target for _, it in scored])
    for (_, it), a, b in zip(scored, raw_nll, target_nll):
        it.nll_raw, it.nll_target = a, b
    summary = summarize(strategy.name, items, ctx.counts)
    summary.update(no_trace=missing, raw_verdicts=dict(Counter(raw_ok)))
    return items, summary


def written(texts) -> int:
    """How many texts a teacher's answer holds: non-empty strings, in lists at any depth (None: no answer)."""
    if isinstance(texts, str):
        return int(bool(texts.strip()))
    return sum(written(t) for t in texts or [])


def summarize(strategy: str, items: Sequence[BridgeItem], counts: Counter) -> dict:
    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return round(sum(values) / len(values), 4) if values else None

    used = [it for it in items if it.target is not None]
    kept = [it for it in used if it.kept]
    return {"strategy": strategy, "problems": len(items), "kept": len(kept),
            "fell_back_to_raw": len(used) - len(kept), "dropped": len(items) - len(used),
            "acceptance": round(len(kept) / len(items), 4) if items else None,
            "candidates": dict(sorted(counts.items())),
            "nll_raw": mean([it.nll_raw for it in used]), "nll_target": mean([it.nll_target for it in used]),
            "nll_raw_kept": mean([it.nll_raw for it in kept]), "nll_bridged_kept": mean([it.nll_target for it in kept])}


def item_rows(items: Sequence[BridgeItem]) -> list[dict]:
    return [asdict(it) for it in items]
