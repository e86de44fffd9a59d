"""The run's held-out evaluation: its sets (the synthetic task's split, benchmark files), each loaded and
gold-checked once, evaluated by label (``before``, a phase's name) and cached in ``<run>/eval/<label>.json``, so
a resumed run does not evaluate a phase twice."""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Callable, Optional

from stagewise_pl.buckets import DEFAULT_BANDS, PassRateBands
from stagewise_pl.io import atomic_write


class HeldOutEvaluation:
    def __init__(self, cfg, task, verifier, render: Callable[[str], str], engine: Callable, rundir,
                 check_golds: Callable, logger=None, bands: PassRateBands = DEFAULT_BANDS):
        self.cfg, self.task, self.verifier, self.render = cfg, task, verifier, render  # render: the PromptRenderer
        self.engine, self.rundir, self.check_golds, self.logger, self.bands = engine, rundir, check_golds, logger, bands
        self._sets: Optional[list] = None

    def sets(self) -> list:
        """(name, gradable problems, new tokens per completion) per evaluation set."""
        if self._sets is None:
            from stagewise_pl.data.loaders import load_eval_benchmark

            ev, sets = self.cfg.eval, []
            if ev.split:
                problems = self.task.split(ev.split)
                if ev.per_level:  # the first per_level problems of each level
                    seen: dict = {}
                    kept = []
                    for p in problems:
                        seen[p.level] = seen.get(p.level, 0) + 1
                        if seen[p.level] <= ev.per_level:
                            kept.append(p)
                    problems = kept
                problems = self.check_golds(problems, f"synthetic-{ev.split}")
                sets.append((f"synthetic-{ev.split}", problems, self.task.max_new_tokens()))
            for bench in ev.benchmarks:
                name, problems, _ = load_eval_benchmark(bench, ev.limit, ev.filter)
                sets.append((name, self.check_golds(problems, name), ev.max_new_tokens or 256))
            self._sets = sets
        return self._sets

    def evaluate(self, label: str):
        from stagewise_pl.eval.evaluate import EvalResult, evaluate_problems

        out_path = self.rundir.eval_file(label)
        if out_path.is_file():
            stored = json.loads(out_path.read_text())
            return OrderedDict((name, EvalResult(**r)) for name, r in stored.items())
        ev = self.cfg.eval
        engine = self.engine()
        results = OrderedDict()
        for name, problems, max_new_tokens in self.sets():
            results[name] = evaluate_problems(engine, self.render, self.verifier, problems, name, k=ev.k,
                                              temperature=ev.temperature, max_new_tokens=ev.max_new_tokens or
                                              max_new_tokens, seed=self.cfg.run.seed, bands=self.bands)
            if self.logger is not None:
                self.logger.log_metrics({f"eval/{label}/{name}/{lvl}/{m}": v
                                         for lvl, row in results[name].by_level.items()
                                         for m, v in row.items() if m != "n"}, step=len(self.rundir.completed()))
        atomic_write(out_path, json.dumps({n: r.to_dict() for n, r in results.items()}, indent=1))
        return results

    @staticmethod
    def accuracy_line(label: str, results) -> str:
        parts = []
        for name, res in results.items():
            levels = ", ".join(f"L{lvl} {row['pass@1']:.2f}" for lvl, row in res.by_level.items() if lvl != "all")
            parts.append(f"{name}: pass@1 {res.by_level['all']['pass@1']:.3f} ({levels})")
        return f"  held-out after {label}: " + "; ".join(parts)
