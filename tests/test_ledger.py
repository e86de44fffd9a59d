"""The difficulty ledger: atomic Parquet parts, queries, checkpoint position, rewind, and GRPO writing to it."""
import json

import pyarrow.parquet as pq
import pytest

from stagewise_pl.config import load_config
from stagewise_pl.ledger import DifficultyLedger
from stagewise_pl.records import RolloutRecord
from stagewise_pl.run import Run


def group(phase, index, step, problem, rewards, kind="grpo"):
    zero = not any(rewards)
    return [RolloutRecord(phase, kind, step, problem, j, float(r), "correct" if r else "wrong", 7, False, zero,
                          None if r else f"{problem} wrong {j}", 0, index, step)
            for j, r in enumerate(rewards)]


def test_queries_across_phases(tmp_path):
    ledger = DifficultyLedger(tmp_path / "ledger", run_id="r1")
    ledger.record(group("1-profile", 1, 0, "a", [0, 0, 0, 0], "profile") + group("1-profile", 1, 0, "b", [1, 0, 1, 1],
                                                                             "profile"))
    ledger.record(group("2-grpo", 2, 0, "a", [0, 0, 0, 0]) + group("2-grpo", 2, 0, "b", [1, 1, 1, 1]))
    ledger.record(group("2-grpo", 2, 1, "a", [0, 1, 0, 0]))
    assert len(ledger) == 20 and len(ledger.parts()) == 3
    assert ledger.pass_rates("1-profile") == {"a": 0.0, "b": 0.75}
    assert ledger.pass_rates("2-grpo") == {"a": 0.125, "b": 1.0}
    assert ledger.never_solved("1-profile") == ["a"] and ledger.never_solved("2-grpo") == []
    history = ledger.history("a")
    assert [(h["phase"], h["phase_kind"], h["rollouts"], h["pass_rate"]) for h in history] == [
        ("1-profile", "profile", 4, 0.0), ("2-grpo", "grpo", 8, 0.125)]
    assert ledger.failures("1-profile", "b") == ["b wrong 1"]
    table = ledger.table()
    assert set(table["run_id"].to_pylist()) == {"r1"} and table.num_rows == 20
    # a second handle on the same directory reads the same records (nothing lives only in memory)
    assert DifficultyLedger(tmp_path / "ledger", run_id="r1").pass_rates("2-grpo") == {"a": 0.125, "b": 1.0}


def reference(rows, phase=None, problems=None, phases=None, first=0, last=None, step=None):
    """The queries answered row by row from every column (what the ledger's coded, incremental index must equal)."""
    keep = [r for r in rows if (phase is None or r["phase"] == phase) and (problems is None or r["problem_id"] in
            problems) and (phases is None or r["phase"] in phases) and r["phase_index"] >= first
            and (last is None or r["phase_index"] <= last) and (step is None or r["global_step"] == step)]
    out = {}
    for r in keep:
        e = out.setdefault(r["problem_id"], [0, 0, []])
        e[0] += r["reason"] == "correct"
        e[1] += 1
        if r["phase"] not in e[2]:
            e[2].append(r["phase"])
    return out


def random_ledger(ledger, rng, parts, first_part=0):
    phases = [("1-profile", 1, "profile"), ("2-grpo", 2, "grpo"), ("3-hpt", 3, "hpt")]
    for k in range(first_part, first_part + parts):
        name, index, kind = phases[min(k // 3, 2)]
        rows = []
        for _ in range(rng.randint(1, 12)):
            pid, reward = f"p{rng.randint(0, 14)}", float(rng.random() < 0.4)
            rows.append(RolloutRecord(name, kind, k, pid, rng.randint(0, 7), reward,
                                      "correct" if reward else rng.choice(["wrong", "no_answer"]), rng.randint(1, 99),
                                      rng.random() < 0.2, False, None if rng.random() < 0.1 else f"{pid} {k}",
                                      0, index, rng.randint(0, 2)))
        ledger.record(rows)


@pytest.mark.parametrize("segment", [256, 2])
def test_queries_equal_a_row_by_row_reading_while_parts_are_added_removed_and_rewritten(tmp_path, monkeypatch,
                                                                                         segment):
    """Each query against the same question asked of every row; with segments of 2 parts the writer keeps its
    index on disk as it goes, a cold handle reads it, and a resume to an earlier part drops what it covered."""
    import random

    import stagewise_pl.ledger_index as index
    from stagewise_pl.report import ledger_stats

    monkeypatch.setattr(index, "SEGMENT_PARTS", segment)
    rng = random.Random(0)
    ledger = DifficultyLedger(tmp_path / "ledger", run_id="r")
    other = DifficultyLedger(tmp_path / "ledger", run_id="r", writer=False)  # another process's handle
    random_ledger(ledger, rng, 5)
    assert other.pass_rates("1-profile")  # reads the five parts; later checks see what changed since
    for round_ in range(3):
        rows = ledger.table().to_pylist()
        for handle in (ledger, other):
            for phase in ("1-profile", "2-grpo", "3-hpt", "none"):
                want = reference(rows, phase)
                assert handle.pass_rates(phase) == {pid: c / n for pid, (c, n, _) in want.items()}
                assert list(handle.pass_rates(phase)) == list(want)  # order of first appearance
                fails = {}
                for r in rows:
                    if r["phase"] == phase and r["reward"] <= 0 and r["completion"] is not None:
                        fails.setdefault(r["problem_id"], []).append(r["completion"])
                assert handle.failures_by_problem(phase) == fails
                assert handle.failures(phase, "p3") == fails.get("p3", [])
            for kw in ({}, {"problems": {"p1", "p2", "zz"}}, {"phases": {"2-grpo", "3-hpt"}, "first": 2},
                       {"last": 2, "step": 1}):
                got = handle.tally(kw.get("problems"), kw.get("phases"), kw.get("first", 0), kw.get("last"),
                                   kw.get("step"))
                assert got == reference(rows, **kw)
            assert handle.tokens_by_phase() == {ph: {"rollouts": sum(r["phase"] == ph for r in rows),
                                                     "tokens": sum(r["completion_tokens"] for r in rows
                                                                   if r["phase"] == ph)}
                                                for ph in dict.fromkeys(r["phase"] for r in rows)}
            assert [h["rollouts"] for h in handle.history("p4")] == [
                sum(r["problem_id"] == "p4" and r["phase"] == ph for r in rows)
                for ph in dict.fromkeys(r["phase"] for r in rows if r["problem_id"] == "p4")]
            assert len(handle) == len(rows)
            assert handle.pass_rates_by_phase(["3-hpt", "1-profile", "none"]) == {
                ph: handle.pass_rates(ph) for ph in ("1-profile", "3-hpt") if handle.pass_rates(ph)}
        segments = sorted(p.name for p in (tmp_path / "ledger" / ".index").glob("seg-*"))
        assert segments == ([] if segment == 256 else
                            [f"seg-{a:06d}-{a + 1:06d}.parquet" for a in range(0, len(ledger.parts()) - 1, 2)])
        stats = ledger_stats(tmp_path, {})["ledger"]  # a cold handle: the segments, then the parts after them
        assert [(s["phase"], s["rollouts"]) for s in stats] == [
            (ph, sum(r["phase"] == ph for r in rows)) for ph in dict.fromkeys(r["phase"] for r in rows)]
        if round_ == 0:
            random_ledger(ledger, rng, 3, first_part=5)  # parts added after the other handle read
        elif round_ == 1:  # a resume elsewhere: back to 4 parts, then other rollouts under the same names
            DifficultyLedger(tmp_path / "ledger", run_id="r").load_state_dict({"parts": 4})
            random_ledger(DifficultyLedger(tmp_path / "ledger", run_id="r"), rng, 4, first_part=4)


def test_a_damaged_index_segment_is_not_read_and_the_writer_makes_it_again(tmp_path, monkeypatch):
    import random

    import stagewise_pl.ledger_index as index

    monkeypatch.setattr(index, "SEGMENT_PARTS", 2)
    ledger = DifficultyLedger(tmp_path / "ledger", run_id="r")
    random_ledger(ledger, random.Random(1), 5)
    want = (ledger.pass_rates("2-grpo"), ledger.tally(None), ledger.tokens_by_phase())
    segment = tmp_path / "ledger" / ".index" / "seg-000000-000001.parquet"
    segment.write_bytes(b"not parquet")
    reader = DifficultyLedger(tmp_path / "ledger", run_id="r", writer=False)
    assert (reader.pass_rates("2-grpo"), reader.tally(None), reader.tokens_by_phase()) == want
    assert segment.read_bytes() == b"not parquet"  # a reader leaves the files as they are
    writer = DifficultyLedger(tmp_path / "ledger", run_id="r")
    assert (writer.pass_rates("2-grpo"), writer.tally(None), writer.tokens_by_phase()) == want
    assert segment.read_bytes()[:4] == b"PAR1"
    assert sorted(p.name for p in segment.parent.iterdir()) == ["seg-000000-000001.parquet",
                                                                  "seg-000002-000003.parquet"]


def test_writes_are_whole_parts_and_a_torn_write_is_never_read(tmp_path):
    ledger = DifficultyLedger(tmp_path / "ledger", run_id="r")
    ledger.record(group("p", 1, 0, "a", [1, 0]))
    torn = tmp_path / "ledger" / ".part-000001.parquet.tmp-999"
    torn.write_bytes(b"PAR1 half a file")  # a crash between the write and its rename
    assert len(DifficultyLedger(tmp_path / "ledger", run_id="r")) == 2  # reopening drops it unread
    assert not torn.exists()
    for part in (tmp_path / "ledger").glob("part-*.parquet"):
        assert pq.read_table(part).num_rows == 2


def test_checkpoint_position_and_rewind(tmp_path):
    ledger = DifficultyLedger(tmp_path / "ledger", run_id="r")
    for step in range(3):
        ledger.record(group("2-grpo", 2, step, f"p{step}", [0, 0]))
    state = ledger.state_dict()
    assert state == {"parts": 3}
    ledger.record(group("2-grpo", 2, 3, "p3", [1, 0]))  # after the checkpoint, before the crash
    ledger.load_state_dict(state)  # resume: the step is made again
    assert len(ledger) == 6 and "p3" not in ledger.pass_rates("2-grpo")
    ledger.rewind("2-grpo", 1)
    assert list(ledger.pass_rates("2-grpo")) == ["p0"]
    ledger.rewind("other", 0)
    assert len(ledger) == 2
    with pytest.raises(RuntimeError, match="parts are missing"):
        ledger.load_state_dict({"parts": 5})


def test_grpo_records_every_graded_rollout_in_the_ledger(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config("default", ["run.progress_bar=false", "eval.k=0", "eval.before=false",
                                  f"run.dir={run_dir}", "phases=[{kind: grpo, steps: 3, lr: 1e-4}]",
                                  "grpo.levels=[5,6]", "grpo.prompts_per_step=4", "grpo.num_generations=4",
                                  "grpo.drop_flat_groups=false"])
    Run(cfg, log=lambda *_: None).execute()
    summary = json.loads((run_dir / "state.json").read_text())["completed"]["1-grpo"]
    ledger = DifficultyLedger(run_dir / "ledger", run_id=run_dir.name)
    assert len(ledger) == summary["rollout_steps"] * 4 * 4
    table = ledger.table().to_pylist()
    assert {r["phase_index"] for r in table} == {1} and {r["phase_kind"] for r in table} == {"grpo"}
    zero_problems = {r["problem_id"] for r in table if r["zero_group"]}
    assert zero_problems and set(ledger.never_solved("1-grpo")) <= zero_problems
    assert all(r["completion"] is not None for r in table if r["reward"] == 0)
    assert all(r["completion"] is None for r in table if r["reward"] > 0)


def test_a_resumed_grpo_phase_leaves_the_ledger_as_an_uninterrupted_one(tmp_path):
    from helpers import CrashAt

    def make(run_dir, *extra):
        cfg = load_config("default", ["run.progress_bar=false", "eval.k=0", "eval.before=false", f"run.dir={run_dir}",
                                      "phases=[{kind: grpo, steps: 5, lr: 1e-4}]", "grpo.levels=[4,5]",
                                      "grpo.prompts_per_step=4", "grpo.num_generations=4",
                                      "grpo.drop_flat_groups=false", "trainer.checkpoint_every_n_steps=2", *extra])
        return Run(cfg, log=lambda *_: None)

    make(tmp_path / "straight").execute()
    crashed = make(tmp_path / "crashed")
    crashed.callbacks.append(CrashAt(3))  # after rollout step 3 recorded; the last checkpoint is at 2
    with pytest.raises(RuntimeError, match="injected crash"):
        crashed.execute()
    assert len(DifficultyLedger(tmp_path / "crashed" / "ledger", "same").parts()) == 3
    make(tmp_path / "crashed", "run.resume=last").execute()
    a = DifficultyLedger(tmp_path / "straight" / "ledger", "same").table().drop(["run_id"])
    b = DifficultyLedger(tmp_path / "crashed" / "ledger", "same").table().drop(["run_id"])
    assert a.num_rows == 5 * 16 and a.equals(b)


def profile_run(run_dir, *extra):
    cfg = load_config("default", ["run.progress_bar=false", "eval.k=0", "eval.before=false", f"run.dir={run_dir}",
                                  "phases=[{kind: profile, steps: 1}]", "profile.limit=40", "profile.k=4",
                                  "profile.chunk=16", *extra])
    return Run(cfg, log=lambda *_: None)


def test_profile_phase_records_k_samples_per_problem(tmp_path):
    # a full profile (sequential: tests/test_profile.py)
    profile_run(tmp_path / "p", "profile.sequential=false").execute()
    summary = json.loads((tmp_path / "p" / "state.json").read_text())["completed"]["1-profile"]
    ledger = DifficultyLedger(tmp_path / "p" / "ledger", run_id="p")
    rates = ledger.pass_rates("1-profile")
    assert len(rates) == 40 and len(ledger) == 160 and len(ledger.parts()) == 3  # 16 + 16 + 8 problems
    assert summary["easy"] + summary["medium"] + summary["hard"] == 40
    assert summary["hard"] == len(ledger.never_solved("1-profile"))
    assert summary["easy"] == sum(rate == 1.0 for rate in rates.values())
    assert 0 < summary["mean_pass_rate"] < 1  # the pool mixes solved and unsolved problems


@pytest.mark.slow  # two runs and a kill
def test_a_profile_cut_short_is_redone_to_the_same_ledger(tmp_path):
    full = "profile.sequential=false"  # one grading call per chunk (a sequential profile grades once per round)
    profile_run(tmp_path / "straight", full).execute()
    run = profile_run(tmp_path / "cut", full)
    calls = {"n": 0}

    class Dies:
        def __init__(self, pool):
            self.pool = pool

        def score_batch(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the first chunk is graded and recorded, the second dies
                raise RuntimeError("killed while grading")
            return self.pool.score_batch(*args, **kwargs)

        def close(self):
            self.pool.close()

    original_setup = run.setup

    def setup():
        original_setup()
        run.ctx.verifier = Dies(run.ctx.verifier)

    run.setup = setup
    with pytest.raises(RuntimeError, match="killed while grading"):
        run.execute()
    assert len(DifficultyLedger(tmp_path / "cut" / "ledger", "x").parts()) == 1
    profile_run(tmp_path / "cut", full, "run.resume=restart").execute()  # cut before its first checkpoint
    a = DifficultyLedger(tmp_path / "straight" / "ledger", "x").table().drop(["run_id"])
    b = DifficultyLedger(tmp_path / "cut" / "ledger", "x").table().drop(["run_id"])
    assert a.num_rows == 160 and a.equals(b)


@pytest.mark.slow
def test_the_ledger_benchmark_answers_as_the_naive_path_does_and_prints_its_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "tools" / "bench_ledger.py"), "--rows", "3000", "70000",
                          "--naive-max", "70000", "--dir", str(tmp_path / "b"), "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]  # it exits 1 where the two paths' answers differ in size
    figures = json.loads((tmp_path / "b.json").read_text())
    assert {(r["rows"], r["op"], r["path"]) for r in figures} == {
        (rows, op, path) for rows in (3000, 70000) for op in ("route", "evidence", "budget", "cft", "report", "append")
        for path in ("stagewise_pl", "naive")}
    assert all(r["seconds"] > 0 and r["size"] > 0 for r in figures)
    assert out.stdout.count("| 70,000 |") == 6
