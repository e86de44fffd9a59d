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
