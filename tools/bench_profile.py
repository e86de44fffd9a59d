"""Profile cost: a full k-sample profile beside a sequential one and a sequential one with earlier evidence, on the
same policies and the same problems, in one run of this script.

1. The plan runs once with the cheapest profile (``profile.sequential=true profile.reuse=true profile.carry=C
   profile.confirm=M``): its profiles are the "sequential + evidence" variant, each measured on the policy of the
   moment, with the run's own history.
2. For every profile of that run, the policy it profiled (the export of the training phase before it, or the base
   model) is profiled again on the same problems (the same seeded ``profile.limit`` draw) in runs of its own:
   ``full`` (all k samples), ``full again`` (all k, other samples: how far two full profiles of one policy agree,
   the noise floor of any comparison) and ``sequential`` (rounds, no earlier evidence).
3. Per profile and over all of them: generated tokens, seconds, and bucket agreement (hard / medium / easy under
   the default bands) of each variant with ``full``, with the confusion matrix. Two full profiles of one policy
   do not agree on every problem (a problem solved 7 times in 8 is easy in one and medium in the other), so the
   agreement of ``full again`` is printed beside each variant's, and each variant's over it.

    python tools/bench_profile.py [--plan default|stagewise] [--seed 0] [--carry 1] [--confirm 1] [--carry-trained]
                                  [--dir D] [--json PATH] [--model-cache DIR] [settings ...]

``--plan default`` is conf/default.yaml (two rounds, 1200 problems a profile); ``--plan stagewise`` is the Claim's
arm (e) of conf/experiments/experiment.yaml (500 problems a profile, its budget, seed ``--seed``). Settings after the
options are fit overrides for the plan's run (for example ``profile.limit=200`` for a shorter check). With
``--json PATH`` the figures are written with ``token_ratio`` (the cheapest variant's tokens over full's, all profiles)
and ``agreement`` (its bucket agreement with full, all profiles' problems), beside ``noise_floor_agreement`` (full
again's) and ``relative_agreement`` (the first over the second). Run it on an otherwise idle machine for the seconds;
tokens and agreement do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stagewise_pl.buckets import BUCKET_ORDER, DEFAULT_BANDS  # noqa: E402

VARIANTS = ("full", "full again", "sequential", "sequential + evidence")


def fit(args: list[str], log: Path) -> None:
    started = time.time()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "stagewise_pl.fit", *args], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT).returncode
    if code:
        raise SystemExit(f"fit failed (exit {code}); its log: {log}\n" + log.read_text()[-3000:])
    print(f"  {log.name}: {time.time() - started:.0f} s", file=sys.stderr)


def plan_args(plan: str, seed: int, root: Path) -> list[str]:
    if plan == "default":
        return ["conf=default", f"run.seed={seed}"]
    from stagewise_pl.experiment.spec import fit_args, load_experiment

    exp = load_experiment(ROOT / "conf" / "experiments" / "experiment.yaml")
    arm = next(a for a in exp.arms if a.name == "stagewise")
    return [a for a in fit_args(exp, arm, seed, root) if not a.startswith("run.dir=")]


def profiles_of(run: Path) -> list[dict]:
    """The run's profile phases in order: name, the policy they profiled, their evidence and summary."""
    state = json.loads((run / "state.json").read_text())
    out, policy = [], None
    for name, summary in state["completed"].items():
        if summary["kind"] == "profile":
            decision = next(d for d in map(json.loads, map(Path.read_text, sorted((run / "routing").glob("*.json"))))
                            if d["phase"] == name)
            out.append({"name": name, "policy": policy, "evidence": decision["evidence"], "summary": summary})
        elif (run / "export" / name / "model.safetensors").is_file():
            policy = run / "export" / name
    return out


def buckets(evidence: dict) -> dict[str, str]:
    return {pid: DEFAULT_BANDS.bucket(e["c"] / e["n"]) for pid, e in evidence.items() if e["n"]}


def agreement(ref: dict[str, str], other: dict[str, str]) -> tuple[int, int, dict]:
    confusion = {a: {b: 0 for b in BUCKET_ORDER} for a in BUCKET_ORDER}
    for pid, a in ref.items():
        confusion[a][other[pid]] += 1
    return sum(confusion[b][b] for b in BUCKET_ORDER), len(ref), confusion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=("default", "stagewise"), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--carry", type=int, default=1, help="profile.carry of the cheapest variant")
    parser.add_argument("--confirm", type=int, default=1, help="profile.confirm of the cheapest variant")
    parser.add_argument("--carry-trained", action="store_true",
                        help="profile.carry_trained=true in the cheapest variant")
    parser.add_argument("--dir", type=Path, help="where the runs go (default: a new directory under /tmp)")
    parser.add_argument("--model-cache", type=Path, help="model.cache_dir (the tiny base model is built there once)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("settings", nargs="*", help="fit overrides for the plan's run")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-profile-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = [f"model.cache_dir={args.model_cache}"] if args.model_cache else []
    cheap = ["profile.sequential=true", "profile.reuse=true", f"profile.carry={args.carry}",
             f"profile.confirm={args.confirm}", f"profile.carry_trained={str(args.carry_trained).lower()}"]
    base = plan_args(args.plan, args.seed, root) + cache + ["run.progress_bar=false"] + list(args.settings)
    run = root / "run"
    print(f"{args.plan} plan with the cheapest profile -> {run}", file=sys.stderr)
    if not (run / "state.json").is_file() or not json.loads((run / "state.json").read_text()).get("finished"):
        fit(base + cheap + [f"run.dir={run}"], root / "run.log")
    rows, pooled = [], {v: [0, 0, {a: {b: 0 for b in BUCKET_ORDER} for a in BUCKET_ORDER}] for v in VARIANTS[1:]}
    totals = {v: {"tokens": 0, "seconds": 0.0, "rollouts": 0} for v in VARIANTS}
    alone = ["eval.before=false", "eval.k=0", "budget.generated_tokens=0"]
    for i, prof in enumerate(profiles_of(run)):
        policy = [f"model.name_or_path={prof['policy']}"] if prof["policy"] else []
        full_dir, seq_dir = root / f"{i + 1}-{prof['name']}-full", root / f"{i + 1}-{prof['name']}-sequential"
        conf = [f"conf={run / 'config.yaml'}", *policy, *alone, "profile.sequential=false", "profile.reuse=false",
                "profile.carry=0"]
        print(f"profile {prof['name']} ({'the base model' if not prof['policy'] else prof['policy'].name})",
              file=sys.stderr)
        if not (full_dir / "state.json").is_file():
            fit(conf + ["phases=[{name: full, kind: profile}, {name: again, kind: profile}]", f"run.dir={full_dir}"],
                full_dir.with_suffix(".log"))
        if not (seq_dir / "state.json").is_file():
            fit(conf + ["profile.sequential=true", "phases=[{name: seq, kind: profile}]", f"run.dir={seq_dir}"],
                seq_dir.with_suffix(".log"))
        found = {p["name"]: p for p in profiles_of(full_dir) + profiles_of(seq_dir)}
        measured = {"full": found["full"], "full again": found["again"], "sequential": found["seq"],
                    "sequential + evidence": prof}
        ref = buckets(found["full"]["evidence"])
        if set(ref) != set(buckets(prof["evidence"])):
            raise SystemExit(f"profile {prof['name']}: the standalone profile saw other problems than the run's")
        row = {"profile": prof["name"], "problems": len(ref)}
        for v in VARIANTS:
            s = measured[v]["summary"]
            same, n, confusion = agreement(ref, buckets(measured[v]["evidence"]))
            row[v] = {"tokens": s["generated_tokens"], "rollouts": s["rollouts"], "seconds": s["seconds"],
                      "agreement": round(same / n, 4), "confusion": confusion, "decided_by": s.get("decided_by")}
            totals[v]["tokens"] += s["generated_tokens"]
            totals[v]["rollouts"] += s["rollouts"]
            totals[v]["seconds"] += s["seconds"]
            if v != "full":
                pooled[v][0] += same
                pooled[v][1] += n
                for a in BUCKET_ORDER:
                    for b in BUCKET_ORDER:
                        pooled[v][2][a][b] += confusion[a][b]
        rows.append(row)
    print(f"\nProfiles of the {args.plan} plan (seed {args.seed}; cheapest: sequential, reuse, carry={args.carry}, "
          f"confirm={args.confirm}, carry_trained={args.carry_trained}); agreement = share of problems in the same "
          f"bucket as `full`\n")
    print("| profile | problems | variant | tokens | ratio to full | rollouts | seconds | agreement | decided by |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for v in VARIANTS:
            m = row[v]
            print(f"| {row['profile']} | {row['problems']} | {v} | {m['tokens']} | "
                  f"{m['tokens'] / max(1, row['full']['tokens']):.2f} | {m['rollouts']} | {m['seconds']:.1f} | "
                  f"{m['agreement']:.3f} | {m['decided_by']} |")
    total_full = max(1, totals["full"]["tokens"])
    floor = pooled["full again"][0] / max(1, pooled["full again"][1])
    sizes = {v: {b: sum(pooled[v][2][a][b] for a in BUCKET_ORDER) for b in BUCKET_ORDER} for v in pooled}
    sizes["full"] = {a: sum(pooled["full again"][2][a].values()) for a in BUCKET_ORDER}
    print("\n| all profiles | tokens | ratio to full | rollouts | seconds | agreement | agreement / full again's "
          "| problem-profiles easy / medium / hard |")
    print("|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        agree = 1.0 if v == "full" else pooled[v][0] / max(1, pooled[v][1])
        print(f"| {v} | {totals[v]['tokens']} | {totals[v]['tokens'] / total_full:.3f} | {totals[v]['rollouts']} | "
              f"{totals[v]['seconds']:.1f} | {agree:.3f} | {agree / floor:.3f} | "
              f"{' / '.join(str(sizes[v][b]) for b in BUCKET_ORDER)} |")
    cheapest = "sequential + evidence"
    print(f"\nconfusion of `{cheapest}` against `full` (rows: full's bucket, columns: its bucket), all profiles:")
    for a in BUCKET_ORDER:
        print(f"  {a:>6}: " + "  ".join(f"{b} {pooled[cheapest][2][a][b]}" for b in BUCKET_ORDER))
    grpo = {name: s.get("generated_tokens", 0) for name, s in
            json.loads((run / "state.json").read_text())["completed"].items() if s["kind"] == "grpo"}
    print(f"GRPO tokens in the run: {grpo}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "plan": args.plan, "seed": args.seed, "carry": args.carry, "confirm": args.confirm,
            "carry_trained": args.carry_trained,
            "token_ratio": round(totals[cheapest]["tokens"] / total_full, 4),
            "agreement": round(pooled[cheapest][0] / max(1, pooled[cheapest][1]), 4),
            "noise_floor_agreement": round(floor, 4),
            "relative_agreement": round(pooled[cheapest][0] / max(1, pooled[cheapest][1]) / floor, 4),
            "bucket_sizes": sizes,
            "totals": totals, "profiles": rows, "grpo_tokens": grpo,
            "confusion": {v: pooled[v][2] for v in pooled}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
