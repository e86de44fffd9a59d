"""Supervised phases: SFT on targets (``sft``), and the base of the phases whose targets are made as they start.

:class:`SFTRunner` -- supervised fine-tuning on the selected problems' ``data.target`` (teacher traces or reference
solutions): a seeded batch order (batch *b* is a pure function of the seed and *b*, so a resumed phase continues
at the exact batch), ``trainer.accumulate_grad_batches`` micro-batches per optimizer step, the completion-only
loss through the fused kernel (:func:`stagewise_pl.models.forward.sft_loss`), AdamW with warm-up and cosine
decay, the non-finite guard before every update. The tiny model's warm-up runs this same runner on examples it
builds itself (:meth:`SFTRunner.on_examples`).

:class:`TaughtRunner` -- SFT on targets made when the phase starts (by rank 0, broadcast to the others), kept in
the checkpoint so a resumed phase trains on the same ones, and written to ``<run>/<folder>/NN-<phase>.jsonl``
with a summary. Replayed problems keep their plain ``data.target`` (or the student's own solution).
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from stagewise_pl import dist
from stagewise_pl.faults import fault_point, poisoned
from stagewise_pl.nonfinite import NonFiniteGuard
from stagewise_pl.phases.base import PHASES, PhaseRunner
from stagewise_pl.phases.optim import guarded_step, phase_optimizer
from stagewise_pl.plan import PhaseTraits


@PHASES.register("sft")
class SFTRunner(PhaseRunner):
    """Supervised fine-tuning on the selected problems' ``data.target``."""

    kind = "sft"
    traits = PhaseTraits(trains=True, supervised=True, gradable_only=False, step_unit="optimizer step")
    builds_at_start = False  # True: the examples are made in start() (they need the policy as the phase begins)

    def __init__(self, ctx, spec, selection, examples: Optional[list] = None, weights: Optional[Sequence] = None,
                 seed: Optional[int] = None):
        super().__init__(ctx, spec, selection)
        from stagewise_pl.data.sft import Collator

        cfg = self.cfg
        self.losses: list[float] = []
        self.examples: list = []
        self.dataset_traces = 0  # targets that are the dataset's teacher traces (data.target=teacher_trace)
        self.weights, self.seed = weights, cfg.run.seed + spec.number if seed is None else seed
        self.guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps, spec.name)
        self.batch_size = spec.batch_size or cfg.trainer.batch_size
        self.accumulate = cfg.trainer.accumulate_grad_batches
        items = len(examples) if examples is not None else len(self.problems)
        if not items:  # an empty bucket: the phase has nothing to do
            self.steps = 0
            return
        self.steps = spec.step_count(items, self.batch_size * self.accumulate * dist.world_size())
        self.collate = Collator(ctx.tokenizer.pad_token_id, self.max_length(), cfg.trainer.packing)
        if examples is not None:
            self.prepare(examples)
        elif not self.builds_at_start:
            replayed = set(self.replay_targets())
            taught = [p for p in self.problems if p.id not in replayed]
            self.dataset_traces = self.count_dataset_traces(taught)
            self.prepare(self.encode_targets(taught) + self.replay_examples())

    @classmethod
    def on_examples(cls, ctx, spec, examples: list, weights: Optional[Sequence] = None, seed: int = 0) -> "SFTRunner":
        """A runner over prepared examples (sampled by ``weights``, batch order seeded by ``seed``), outside a
        plan: the tiny model's warm-up, benchmarks."""
        from stagewise_pl.routing.selection import Selection

        return cls(ctx, spec, Selection(spec.name, cls.kind, "all", []), examples=examples, weights=weights, seed=seed)

    def targets(self, problems) -> list[tuple[str, str]]:
        """(user message, completion) per problem: what this kind teaches. The built-in ``sft`` teaches
        ``data.target`` (a teacher trace or the reference solution); a supervised kind written outside the package
        overrides this alone (see tests/phase_plugins.py)."""
        from stagewise_pl.data.examples import sft_target

        return [(p.prompt, sft_target(p, self.cfg.data.target, self.cfg.data.answer_line)) for p in problems]

    def count_dataset_traces(self, problems) -> int:
        """How many of ``problems`` the built-in target makes learn a teacher trace of the dataset (a teacher wrote
        each: the cost a real teacher would have); a kind with its own ``targets`` counts none."""
        builtin = type(self).targets is SFTRunner.targets
        return len(problems) if builtin and self.cfg.data.target == "teacher_trace" else 0

    def encode_targets(self, problems) -> list:
        from stagewise_pl.data.examples import encode_pairs

        return encode_pairs(self.ctx.tokenizer, self.targets(problems), self.cfg.trainer.max_length, self.ctx.renderer)

    def replay_targets(self) -> dict[str, str]:
        """Replayed problem id -> its target when the routing chose the student's own solutions (data.replay_target
        = own); {} otherwise."""
        return self.selection.replay_targets

    def replay_examples(self) -> list:
        """Examples of the problems replayed with the student's own solutions ([] unless data.replay_target = own;
        otherwise replayed problems train on data.target like the rest)."""
        from stagewise_pl.data.examples import encode_pairs

        own = self.replay_targets()
        if own:
            by_id = {p.id: p for p in self.problems}
            return encode_pairs(self.ctx.tokenizer, [(by_id[pid].prompt, text) for pid, text in own.items()],
                                self.cfg.trainer.max_length, self.ctx.renderer)
        return []

    def max_length(self) -> int:
        return self.cfg.trainer.max_length

    def teacher_texts(self) -> int:
        """Texts a teacher wrote for this phase's targets (``teacher_texts`` in its summary)."""
        return self.dataset_traces

    def prepare(self, examples: list) -> None:
        """The phase's examples and its seeded batch order; no examples ends the phase."""
        from stagewise_pl.data.sft import StepBatchSampler

        self.examples = examples
        if not examples:
            self.steps = 0
            return
        self.sampler = StepBatchSampler(len(examples), self.batch_size, self.steps * self.accumulate, self.seed,
                                        self.weights, rank=dist.rank(), world_size=dist.world_size())

    def total_steps(self) -> int:
        return self.steps

    def configure_optimizers(self, module):
        o = self.cfg.optim
        return phase_optimizer(module.policy, o, o.lr if self.spec.lr is None else self.spec.lr, self.steps)

    def start(self, module, resumed: bool) -> None:
        module.policy.train()

    def step(self, module, step: int) -> None:
        from stagewise_pl.models.forward import sft_loss

        total = 0.0
        for micro in range(self.accumulate):
            indices = self.sampler.batch(step * self.accumulate + micro)
            batch = {k: v.to(module.device) for k, v in self.collate([self.examples[i] for i in indices]).items()}
            loss, _ = sft_loss(module.policy, batch, self.cfg.trainer.kernel)
            if poisoned(f"nan_loss:{self.spec.name}:{step + 1}"):
                loss = loss * float("nan")
            module.manual_backward(loss / self.accumulate)
            total += float(loss.detach()) / self.accumulate
        fault_point("sft_backward")
        self.position += 1
        if not guarded_step(module, self.guard, total, step + 1, self.cfg.optim.grad_clip):
            module.log_row({f"{self.spec.name}/train/nonfinite_skipped": float(self.guard.skipped)})
            return  # NaN/inf: no update, the step is used up
        self.losses.append(total)
        module.log_row({f"{self.spec.name}/train/loss": total, f"{self.spec.name}/train/lr":
                        float(module.lr_schedulers().get_last_lr()[0])}, every=self.cfg.trainer.log_every_n_steps)
        module.bar("loss", total)

    def state_dict(self) -> dict:
        return {"position": self.position, "losses": self.losses, "nonfinite": self.guard.state_dict()}

    def curves(self) -> dict[str, list]:
        return {"loss": self.losses} if self.losses else {}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.losses = int(state["position"]), list(state.get("losses", []))
        self.guard.load_state_dict(state.get("nonfinite", {}))

    def brief_parts(self, summary: dict) -> list[str]:
        get, parts = summary.get, []
        if get("examples") is not None:
            parts.append(f"{get('examples'):,} examples".replace(",", " "))
        if get("final_loss") is not None:
            parts.append(f"loss {get('final_loss'):.3f}")
        return parts

    def summary(self) -> dict:
        spec = self.spec  # with passes: the steps of its share it did not use, and the phase they go to
        carried = {"carried_steps": spec.steps - self.steps, "carried_to": spec.carry_to} \
            if spec.passes > 0 and spec.carry_to else {}
        if not self.problems and not self.examples:
            return {"kind": self.kind, "steps": 0, "problems": 0, **carried}
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"kind": self.kind, "steps": self.position, "optimizer_steps": len(self.losses),
                "problems": len(self.problems), "examples": len(self.examples),
                "final_loss": round(sum(tail) / len(tail), 4) if tail else None, "target": self.cfg.data.target,
                "teacher_texts": self.teacher_texts(),
                **({"nonfinite_skipped": self.guard.skipped} if self.guard.skipped else {}), **carried}


class TaughtRunner(SFTRunner):
    """SFT on targets made when the phase starts (see the module's docstring); subclasses make the rows."""

    builds_at_start = True
    folder = ""

    def __init__(self, ctx, spec, selection, **kwargs):
        super().__init__(ctx, spec, selection, **kwargs)
        replayed = set(selection.replay)
        self.taught = [p for p in self.problems if p.id not in replayed]
        self.replayed = [p for p in self.problems if p.id in replayed]
        self.rows: Optional[list[dict]] = None  # (problem id, kind, prompt, target) per example, once made
        self.report: dict = {}

    def make_rows(self) -> tuple[list[dict], dict]:
        raise NotImplementedError

    def weight(self, kind: str) -> float:
        return 1.0

    def start(self, module, resumed: bool) -> None:
        super().start(module, resumed)
        if not self.steps or self.examples:
            return
        if self.rows is None:  # a fresh phase (a resumed one has its rows from the checkpoint)
            payload = self.make_and_write() if dist.is_main() else None
            self.rows, self.report = dist.broadcast(payload)
        self.prepare(self.encode(self.rows))

    def make_and_write(self) -> tuple[list[dict], dict]:
        rows, report = self.make_rows()
        rundir = self.ctx.rundir
        if rundir is not None:
            from stagewise_pl.io import atomic_write

            base = rundir.phase_file(self.folder, self.spec.number, self.spec.name, "")
            atomic_write(base.with_name(base.name + ".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write(base.with_name(base.name + ".summary.json"), json.dumps(report, indent=1))
        self.ctx.log(f"phase {self.spec.name}: {self.describe(report)}")
        return rows, report

    def describe(self, report: dict) -> str:
        return json.dumps(report)

    def encode(self, rows: list[dict]) -> list:
        from stagewise_pl.data.examples import encode_pairs

        examples = encode_pairs(self.ctx.tokenizer, [(r["prompt"], r["target"], self.weight(r["kind"]))
                                                     for r in rows], self.max_length(), self.ctx.renderer)
        if self.replay_targets():
            examples += self.replay_examples()
        elif self.replayed:
            examples += encode_pairs(self.ctx.tokenizer, SFTRunner.targets(self, self.replayed),
                                     self.cfg.trainer.max_length, self.ctx.renderer)
            self.dataset_traces = len(self.replayed) if self.cfg.data.target == "teacher_trace" else 0
        return examples

    def state_dict(self) -> dict:
        return dict(super().state_dict(), rows=self.rows, report=self.report)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rows, self.report = state.get("rows"), state.get("report") or {}

    def summary(self) -> dict:
        scalars = {k: v for k, v in self.report.items() if not isinstance(v, (dict, list))}
        return {**super().summary(), "target": self.folder, **scalars, "teacher_texts": self.teacher_texts()}

    def teacher_texts(self) -> int:
        """What the teacher wrote while the rows were made, and the dataset traces of plainly replayed problems."""
        return int(self.report.get("teacher_texts", 0)) + self.dataset_traces
