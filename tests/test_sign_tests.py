"""tools/sign_tests.py: the per-problem comparison of an experiment's arms against one of them, on hand-made run
directories (the files a run writes: state.json, eval/<phase>.json)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import sign_tests  # noqa: E402


def write_run(directory: Path, correct: list[int], before: list[int] = (), tokens: int = 100, texts: int = 0,
              finished: bool = True) -> None:
    (directory / "eval").mkdir(parents=True)
    completed = {"train": {"kind": "grpo", "generated_tokens": tokens, "teacher_texts": texts,
                           "optimizer_steps": 5, "seconds": 120.0}}
    (directory / "state.json").write_text(json.dumps({"finished": finished, "completed": completed}))

    def results(bits):
        return {"synthetic-test": {"by_level": {"all": {"n": len(bits), "pass@1": sum(bits) / len(bits)}},
                                   "problems": {f"p{i}": [float(b), None] for i, b in enumerate(bits)}}}

    (directory / "eval" / "train.json").write_text(json.dumps(results(correct)))
    if before:
        (directory / "eval" / "before.json").write_text(json.dumps(results(before)))


def test_the_sign_test_is_the_exact_two_sided_binomial():
    assert sign_tests.sign_test(0, 0) == 1.0
    assert sign_tests.sign_test(3, 3) == 1.0
    assert sign_tests.sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_tests.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_tests.sign_test(1, 9) == sign_tests.sign_test(9, 1)


def test_arms_are_paired_with_the_reference_by_seed_and_problem(tmp_path):
    write_run(tmp_path / "method" / "seed-0", [1, 1, 0, 0], before=[0, 0, 0, 0], texts=10)
    write_run(tmp_path / "method" / "seed-1", [1, 0, 1, 0], before=[0, 0, 0, 1], texts=12)
    write_run(tmp_path / "rival" / "seed-0", [1, 0, 1, 1], tokens=300)  # better on p2 p3, worse on p1
    write_run(tmp_path / "rival" / "seed-1", [1, 0, 1, 0], tokens=500)  # the same as the method's seed 1
    write_run(tmp_path / "rival" / "seed-2", [1, 1, 1, 1])  # no method seed 2: not paired, but in the mean
    write_run(tmp_path / "rival" / "seed-3", [0, 0, 0, 0], finished=False)  # stopped: left out
    rows = {r["arm"]: r for r in sign_tests.compare(tmp_path, "method", ["method", "rival"])}
    rival = rows["rival"]
    assert rival["seeds"] == [0, 1, 2] and (rival["b"], rival["c"]) == (2, 1)
    assert rival["p"] == pytest.approx(1.0) and rival["pass@1"] == [0.75, 0.5, 1.0]
    assert rival["generated_tokens"] == pytest.approx(300) and rival["minutes"] == pytest.approx(2.0)
    assert (rows["method"]["b"], rows["method"]["c"]) == (0, 0)
    base = rows["base"]  # before training (the reference arm's runs): right on 1 the method missed, wrong on 4
    assert (base["b"], base["c"]) == (1, 4) and base["generated_tokens"] is None
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sign_tests.py"), str(tmp_path), "--arms",
                          "method,rival"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| rival | 0,1,2 | 0.750 ± 0.250 | 2 / 1 (p = 1) |" in out.stdout
    assert "| base | 0,1 |" in out.stdout


def test_a_missing_reference_arm_is_a_clear_error(tmp_path):
    write_run(tmp_path / "rival" / "seed-0", [1])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sign_tests.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no finished runs of the reference arm" in out.stderr
