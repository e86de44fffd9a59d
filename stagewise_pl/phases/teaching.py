"""The teaching phases: ``bridge_sft`` (teacher traces made learnable) and ``cft`` (critique fine-tuning).

Both are reconstructions (the paper's body was not available; see docs/ARCHITECTURE.md): every choice is a
config option in the ``bridge`` and ``cft`` groups. Their targets are made as the phase starts, from the
student as it is then (:class:`~stagewise_pl.phases.supervised.TaughtRunner`).
"""
from __future__ import annotations

from stagewise_pl.phases.base import PHASES
from stagewise_pl.phases.supervised import TaughtRunner
from stagewise_pl.plan import PhaseTraits, earlier


@PHASES.register("bridge_sft")
class BridgeSFTRunner(TaughtRunner):
    """SFT on teacher traces made learnable by the student (``bridge.strategy``, :mod:`stagewise_pl.bridge`):
    acceptance and the student's NLL of bridged vs raw targets are logged before training."""

    kind, folder = "bridge_sft", "bridge"
    traits = PhaseTraits(trains=True, supervised=True, generates=True, uses_teacher=True,
                         step_unit="optimizer step")

    def make_rows(self):
        from stagewise_pl.bridge import make_strategy, run_bridge

        ctx = self.bridge_context()
        items, report = run_bridge(make_strategy(self.cfg.bridge), ctx, self.taught)
        report["generated_tokens"], report["teacher_texts"] = ctx.generated_tokens, ctx.teacher_texts
        by_id = {p.id: p for p in self.taught}
        rows = [{"problem_id": it.problem_id, "kind": "bridged" if it.kept else "raw",
                 "prompt": by_id[it.problem_id].prompt, "target": it.target, "raw": it.raw, "reason": it.reason,
                 "nll_raw": it.nll_raw, "nll_target": it.nll_target} for it in items if it.target is not None]
        return rows, report

    def brief_parts(self, summary: dict) -> list[str]:
        parts = super().brief_parts(summary)
        if summary.get("acceptance") is not None and summary.get("strategy") not in (None, "raw"):
            parts.append(f"bridged {summary.get('kept')} (acceptance {summary['acceptance']:.2f})")
        return parts

    def describe(self, r: dict) -> str:
        return (f"bridge {r['strategy']}: {r['kept']} of {r['problems']} bridged (acceptance {r['acceptance']}), "
                f"{r['fell_back_to_raw']} raw, {r['dropped']} dropped; student NLL raw {r['nll_raw']} -> "
                f"target {r['nll_target']}; candidates {r['candidates']}")

    def start(self, module, resumed: bool) -> None:
        super().start(module, resumed)
        r = self.report
        if r and not resumed:
            module.log_row({f"{self.spec.name}/bridge/{k}": float(v) for k, v in r.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})


@PHASES.register("cft")
class CFTRunner(TaughtRunner):
    """Critique fine-tuning (:mod:`stagewise_pl.cft`): diagnoses, verified repairs and bridged traces of the
    selected problems' failed rollouts, each kind's loss weighted by ``cft.weights``, loss on the target only."""

    kind, folder = "cft", "cft"
    traits = PhaseTraits(trains=True, supervised=True, generates=True, reads_rollouts=True, uses_teacher=True,
                         step_unit="optimizer step")

    def max_length(self) -> int:
        return self.cfg.cft.max_length

    def weight(self, kind: str) -> float:
        return float(self.cfg.cft.weights.get(kind, 1.0))

    def failures(self) -> dict[str, list[str]]:
        """Each problem's failed rollouts in the latest earlier phase that recorded rollouts and graded it."""
        ctx, out = self.ctx, {}
        for spec in reversed(earlier(ctx.plan, self.spec)):
            if ctx.traits[spec.kind].records_rollouts:
                for pid, texts in ctx.ledger.failures_by_problem(spec.name).items():
                    out.setdefault(pid, texts)
        return out

    def make_rows(self):
        from stagewise_pl.bridge import make_strategy
        from stagewise_pl.cft import build_cft

        ctx, teachers = self.bridge_context(), self.ctx.teachers
        items, report = build_cft(ctx, teachers.critic(), teachers.teacher(), make_strategy(self.cfg.bridge),
                                  self.taught, self.failures(), self.cfg.cft)
        report["generated_tokens"], report["teacher_texts"] = ctx.generated_tokens, ctx.teacher_texts
        return [{"problem_id": it.problem_id, "kind": it.kind, "prompt": it.prompt, "target": it.target,
                 "failure": it.failure} for it in items], report

    def describe(self, r: dict) -> str:
        return f"CFT data from {r['failures']} failures of {r['problems']} problems: kept {r['kept']}; {r['outcomes']}"
