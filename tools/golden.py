"""Golden digests: small plans that cover every phase kind, run on the real tiny base, reduced to what must not move
when code is reorganised -- final weights, ledger, per-step curves, phase summaries (wall times left out), routing
decisions -- and the base model's own weights. A refactor that claims "no numerical change" shows the same digests
before and after:

    python tools/golden.py --out before.json                 # on the old commit
    python tools/golden.py --compare before.json             # on the new one: exit 1 and the differences if any

Each plan runs ``python -m stagewise_pl.fit`` in a fresh process with ``run.deterministic=true``. The base is built
in ``--cache`` (a temporary directory by default: built fresh, so the warm-up's own code is checked too; pass a
directory to reuse one). Bit-identical holds on one machine with one thread count (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import fit, outcome  # noqa: E402

BASE = ["run.progress_bar=false", "eval.k=0", "trainer.log_every_n_steps=1", "eval.before=false",
        "run.deterministic=true"]
PLANS = {
    # the fault suite's golden run (tests/test_faults.py)
    "faults": ["phases=[{name: s, kind: sft, steps: 4, lr: 5e-4}, {name: p, kind: profile, limit: 40}, "
               "{name: g, kind: grpo, select: medium, steps: 3, lr: 1e-4}, "
               "{name: c, kind: cft, select: unsolved_in_rl, steps: 3, lr: 1e-4}]",
               "profile.k=4", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_new_tokens=24",
               "trainer.batch_size=16", "trainer.checkpoint_every_n_steps=2", "eval.each_phase=false",
               "bridge.samples=2"],
    # the peers (tests/test_mixed.py's kill-and-resume plan)
    "mixed": ["phases=[{name: h, kind: hpt, steps: 3, lr: 1e-4}, {name: r, kind: relift, steps: 4, lr: 1e-4}]",
              "grpo.prompts_per_step=6", "grpo.num_generations=4", "grpo.max_new_tokens=24",
              "trainer.checkpoint_every_n_steps=2", "eval.each_phase=false", "mixed.buffer_size=3",
              "grpo.levels=[4,5,6]"],
    # the default's kinds in small: a sequential profile, Bridge SFT with replay, a re-profile on the hard bucket,
    # GRPO, and an evaluation after each phase
    "method": ["phases=[{name: p, kind: profile, limit: 60}, "
               "{name: b, kind: bridge_sft, select: hard, replay: 0.5, steps: 3, lr: 5e-4}, "
               "{name: q, kind: profile, select: hard, limit: 60}, "
               "{name: g, kind: grpo, select: medium, steps: 2, lr: 1e-4}, {name: e, kind: eval}]",
               "profile.sequential=true", "grpo.prompts_per_step=4", "grpo.num_generations=4",
               "grpo.max_new_tokens=24", "trainer.batch_size=16", "bridge.samples=2", "eval.k=2",
               "eval.per_level=4", "eval.each_phase=true"],
}


def base_digest(cache: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(cache.rglob("model.safetensors")):
        h = hashlib.sha256()
        for name, t in sorted(load_file(str(f)).items()):
            h.update(name.encode() + t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
        out[str(f.parent.relative_to(cache))] = h.hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the digests here")
    ap.add_argument("--compare", type=Path, help="compare with digests written by --out; exit 1 on any difference")
    ap.add_argument("--cache", type=Path, help="the base model's cache (default: a new temporary directory)")
    ap.add_argument("--plans", nargs="*", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--work", type=Path, help="where the runs go (default: a temporary directory)")
    a = ap.parse_args()
    cache = a.cache or Path(tempfile.mkdtemp(prefix="golden-cache-"))
    work = a.work or Path(tempfile.mkdtemp(prefix="golden-runs-"))
    got: dict = {}
    for name in a.plans:
        run_dir = work / name
        out = fit(BASE + PLANS[name] + [f"model.cache_dir={cache}", f"run.dir={run_dir}"])
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            print(f"plan {name}: exit {out.returncode}", file=sys.stderr)
            return 2
        got[name] = outcome(run_dir)
        print(f"{name}: weights {got[name]['weights'][:16]}, ledger {got[name]['ledger'][:16]} "
              f"({got[name]['ledger_rows']} rows)", flush=True)
    got["base"] = base_digest(cache)
    if a.out:
        a.out.write_text(json.dumps(got, indent=1, sort_keys=True))
    if a.compare:
        want = json.loads(a.compare.read_text())
        diff = [f"{plan}.{key}" for plan in got for key in (got[plan] if isinstance(got[plan], dict) else [])
                if plan in want and want[plan].get(key) != got[plan][key]]
        print("identical" if not diff else "DIFFERENT: " + ", ".join(diff))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
