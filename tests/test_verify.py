"""Verifiers: gold solutions, mismatches, adversarial input under a hard bound, reward hacking, plug-ins, CLI."""
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import benchmarks_dir
from stagewise_pl.config import load_config
from stagewise_pl.data.loaders import load_benchmark
from stagewise_pl.data.problems import Problem
from stagewise_pl.verify import get_verifier, make_verifier
from stagewise_pl.verify.gold import FLAG, flag_ungradable_golds, gradable
from stagewise_pl.verify.math import extract_final_answer
from stagewise_pl.verify.pool import GradingPool

TESTS = Path(__file__).resolve().parent
BOUND = 2.0
SLACK = 15.0  # seconds over a time bound that a test allows: a net for a loaded machine, well under the hangs' 60 s


@pytest.fixture(scope="module")
def math_pool():
    with GradingPool("math", workers=2, timeout_s=BOUND, retries=0) as pool:  # retries: tested on their own
        yield pool


# ---------------------------------------------------------------- gold solutions
GOLD_FILES = ["math500", "gsm8k_test", "minerva_math", "aime24"]


def known_failures() -> dict:
    return json.loads((TESTS / "data" / "verifier_gold_audit.json").read_text())["known_failures"]


@pytest.mark.parametrize("stem", GOLD_FILES)
def test_gold_solutions_grade_correct(math_pool, stem):
    problems, _ = load_benchmark(benchmarks_dir() / f"{stem}.jsonl")
    verdicts = math_pool.score_batch([p.solution or "" for p in problems], [p.answer for p in problems])
    failures = {p.id: v.reason for p, v in zip(problems, verdicts) if v.reason != "correct"}
    listed = known_failures().get(stem, {})
    assert {k: listed.get(k, {}).get("reason") for k in failures} == failures, "unlisted gold failures"
    assert 1 - len(failures) / len(problems) >= 0.99


@pytest.mark.parametrize("stem", GOLD_FILES)
def test_solutions_against_another_rows_answer_are_wrong(math_pool, stem):
    problems, _ = load_benchmark(benchmarks_dir() / f"{stem}.jsonl")
    others = problems[1:] + problems[:1]
    # do the two gold answers differ mathematically? The verifier's own judgement of the clean answers.
    same_gold = math_pool.score_batch([f"\\boxed{{{p.answer}}}" for p in problems], [o.answer for o in others])
    verdicts = math_pool.score_batch([p.solution or "" for p in problems], [o.answer for o in others])
    differ = [(p, v) for p, v, g in zip(problems, verdicts, same_gold) if g.reason == "wrong"]
    assert len(differ) >= 0.9 * len(problems)
    accepted = [p.id for p, v in differ if v.reward != 0.0]
    assert not accepted, f"solutions accepted against a different answer: {accepted[:10]}"


# ---------------------------------------------------------------- adversarial input
ADVERSARIAL = {
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "factorial": "\\boxed{100000!}",
    "factorial plain": "The answer is 100000!",
    "1 MB of braces": "{" * 500_000 + "}" * 500_000,
    "1 MB boxed braces": "\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
    "10000 boxes": "\\boxed{1}" * 10_000,
    "nested frac": "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "invalid utf-8": b"\\boxed{\xff\xfe 3}".decode("utf-8", "surrogateescape"),
    "empty": "",
    "huge exponent": "\\boxed{10^{10^{10}}}",
}


def _timed(pool, completion):
    started = time.monotonic()
    verdict = pool.score(completion, "5")
    return verdict, time.monotonic() - started


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_on_the_main_thread(math_pool, name):
    verdict, seconds = _timed(math_pool, ADVERSARIAL[name])
    # the bound holds: a net of 15 s over the tries' bounds (an unbounded call runs for minutes), so a loaded
    # machine's slower worker restart does not decide the test
    assert seconds <= (1 + math_pool.retries) * BOUND + SLACK, f"{name} took {seconds:.1f} s"
    assert verdict.reward == 0.0 and verdict.reason in {"wrong", "no_answer", "timeout", "error"}
    assert math_pool.score("\\boxed{5}", "5").reason == "correct"  # the pool keeps serving


def test_adversarial_from_a_thread_pool_with_bounded_memory(math_pool):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases = list(ADVERSARIAL.values()) + ["\\boxed{5}"] * 6
    with ThreadPoolExecutor(max_workers=4) as threads:
        results = list(threads.map(lambda c: _timed(math_pool, c), cases))
    # 4 threads share 2 workers: a call may wait for one stuck call before its own bound starts
    assert all(seconds <= 2 * ((1 + math_pool.retries) * BOUND + SLACK) for _, seconds in results)
    assert [v.reason for v, _ in results[-6:]] == ["correct"] * 6
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 100, f"the calling process grew by {grown_mb:.0f} MB"


def test_crash_memory_hog_hang_and_bug_are_contained(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with GradingPool("verifier_plugins:MisbehavingVerifier", workers=1, timeout_s=3.0, memory_mb=1024) as pool:
        assert pool.score("crash", "1").reason == "error"
        assert pool.score("hog", "1").reason == "error"  # MemoryError at the 1 GiB limit (none: "correct")
        started = time.monotonic()
        assert pool.score("sleep", "1").reason == "timeout"
        assert time.monotonic() - started < 2 * 3.0 + SLACK  # a try and one retry, each bounded, not the 60 s
        assert pool.score("raise", "1").reason == "error"
        assert pool.score("fine", "1").reason == "correct"
        # crash and the sleep's two tries restart a worker; hog and raise are caught in the worker
        assert pool.restarts == 3 and pool.timeouts == 1 and pool.retried == 1 and pool.errors == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_a_batch_streams_past_crashes_and_hangs(monkeypatch, workers):
    """score_batch sends shares of the batch as one message each; every verdict still has its own bound,
    and a worker that dies or hangs mid-share is replaced and the rest of its share graded."""
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    batch = ["fine", "crash", "fine", "sleep", "raise", "fine", "hog", "fine"]
    with GradingPool("verifier_plugins:MisbehavingVerifier", workers=workers, timeout_s=4.0, memory_mb=1024) as pool:
        started = time.monotonic()
        reasons = [v.reason for v in pool.score_batch(batch, ["1"] * len(batch))]
        # the hang sleeps 60 s: it costs two bounds of 4 s (a try and a retry, plus starting workers), not 60
        assert time.monotonic() - started < 2 * 4.0 + 2 * SLACK
        assert reasons == ["correct", "error", "correct", "timeout", "error", "correct", "error", "correct"]
        assert pool.timeouts == 1 and pool.retried == 1 and pool.restarts == 3
        assert [v.reason for v in pool.score_batch(["fine"] * 5, ["1"] * 5)] == ["correct"] * 5


@pytest.mark.parametrize("retries", [0, 1])
def test_a_stall_is_graded_again_on_a_fresh_worker_before_it_is_a_timeout(monkeypatch, tmp_path, retries):
    """A stall that a loaded machine causes once is not a verdict: the completion is graded again on the
    replacement worker, so the run grades the same as on an idle machine; with retries=0 it is a 'timeout'."""
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    marker = str(tmp_path / "stalled")
    with GradingPool("verifier_plugins:StallOnceVerifier", {"marker": marker}, timeout_s=2.0,
                     retries=retries) as pool:
        reasons = [v.reason for v in pool.score_batch(["fine", "stall", "fine"], ["1"] * 3)]
        assert reasons == ["correct", "correct" if retries else "timeout", "correct"]
        assert (pool.retried, pool.timeouts, pool.restarts) == ((1, 0, 1) if retries else (0, 1, 1))
    with pytest.raises(ValueError, match="retries"):
        GradingPool("exact", retries=-1)


# ---------------------------------------------------------------- reward hacking
@pytest.fixture(scope="module")
def math_verifier():
    return get_verifier("math")


@pytest.mark.parametrize("completion,gold,reason", [
    ("First \\boxed{12}, then subtract 5: \\boxed{7}", "7", "correct"),      # the last box is graded
    ("So x = \\boxed{12}. Finally x - 5 = \\boxed{7}", "12", "wrong"),       # an intermediate box is not
    ("\\boxed{3 \\text{ or } 4}", "3", "wrong"),                              # a hedge is wrong
    ("\\boxed{3, 4}", "3", "wrong"),
    ("The result is \\boxed{}", "3", "no_answer"),
    ("Given 12 apples and 7 pears, with 5 eaten, we consider 12, 7 and 5.", "14", "no_answer"),
    ("#### 1,234", "1234", "correct"),
    ("The answer is $\\frac{3}{4}$.", "0.75", "correct"),
    ("\\boxed{50\\%}", "\\frac{1}{2}", "correct"),
    ("\\boxed{[1, 2)}", "[1,2)", "correct"),
    ("\\boxed{(1, 2]}", "[1,2)", "wrong"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", "correct"),
    ("\\boxed{5\\text{ cm}}", "5", "correct"),
    ("\\boxed{104.}", "104", "correct"),
    ("so $d = \\boxed{\\textbf{(073)}}.$", "073", "correct"),
    ("Adding, $180 + 24 = 204$. -author", "204", "correct"),                  # a stated final value
])
def test_reward_hacking_and_forms(math_verifier, completion, gold, reason):
    assert math_verifier.score(completion, gold).reason == reason


def test_grading_after_think():
    strict = get_verifier("math", after_think=True)
    assert strict.score("<think>it is \\boxed{7}</think> I am done.", "7").reason == "no_answer"
    assert strict.score("<think>maybe 6</think> So \\boxed{7}", "7").reason == "correct"
    assert strict.score("no think block \\boxed{7}", "7").reason == "no_answer"
    assert get_verifier("math").score("<think>it is \\boxed{7}</think> I am done.", "7").reason == "correct"
    assert get_verifier("exact", after_think=True).score("<think>#### 7</think>", "7").reason == "no_answer"


def test_ungradable_gold(math_verifier):
    assert math_verifier.score("\\boxed{1}", "").reason == "ungradable_gold"
    assert math_verifier.score("\\boxed{1}", "\\frac{").reason in {"ungradable_gold", "wrong"}


def test_extraction_order():
    assert extract_final_answer("#### 5\n\\boxed{6}") == "6"
    assert extract_final_answer("#### 5\nThe answer is 7") == "5"
    assert extract_final_answer("The answer is 7.\nthen 3 + 4 = 8") == "7"
    assert extract_final_answer("3 + 4 = 7", final_equation=False) is None


def test_exact_verifier():
    exact = get_verifier("exact")
    assert exact.score("12+7=19\n#### 19", "19").reason == "correct"
    assert exact.score("#### 19\n#### 20", "20").reason == "wrong"  # commits to the first answer line
    assert exact.score("#### 3/4", "0.75").reason == "correct"
    assert exact.score("#### 1,000", "1000").reason == "correct"
    assert exact.score("no answer", "1").reason == "no_answer"
    assert exact.score("#### 1", "").reason == "ungradable_gold"


# ---------------------------------------------------------------- registry, gold check, config
def test_third_party_verifier_by_dotted_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = load_config("default", ["verifier.name=verifier_plugins:LengthVerifier", "verifier.options={scale: 2}"])
    with make_verifier(cfg.verifier) as pool:
        assert [v.reason for v in pool.score_batch(["abc", "abcd"], ["6", "6"])] == ["correct", "wrong"]


def test_unknown_verifier_fails_at_construction():
    with pytest.raises(RuntimeError, match="unknown verifier 'nope'"):
        GradingPool("nope", workers=1)


def test_ungradable_golds_are_flagged_and_left_out():
    problems = [Problem("a", "q", "2", "t"), Problem("b", "q", "", "t"), Problem("c", "q", "\\frac{", "t"),
                Problem("d", "q", "2", "t")]
    with GradingPool("exact", workers=1) as pool:
        reasons = flag_ungradable_golds(problems, pool)
    # an empty gold, and an unbalanced one that cannot even be written as a final answer
    assert reasons == {"ungradable_gold": 1, "no_answer": 1}
    assert problems[1].meta[FLAG] == "ungradable_gold" and problems[2].meta[FLAG] == "no_answer"
    assert [p.id for p in gradable(problems)] == ["a", "d"]


# ---------------------------------------------------------------- command line
def test_cli_grades_a_file(tmp_path):
    rows = [{"completion": "so \\boxed{4}", "answer": "4", "problem": "2+2 \\boxed{5}"},
            {"completion": "#### 5", "answer": 4}, {"completion": "\\boxed{9^{9^{9^{9}}}}", "answer": "1"},
            {"answer": "1"}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.verify", str(path), "--out", str(tmp_path / "o.jsonl"),
                          "--timeout", "2", "--retries", "0", "--no-progress"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 3, out.stderr  # some rows were bad: graded the rest, named them, exit 3
    assert f"{path}:4: needs 'completion'" in out.stderr and f"{path}:5: invalid JSON" in out.stderr
    graded = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [g["reason"] for g in graded] == ["correct", "wrong", "timeout", "bad_row", "bad_row"]
    assert graded[0]["problem"] == rows[0]["problem"] and graded[0]["reward"] == 1.0
    for reason, n in [("correct", 1), ("wrong", 1), ("timeout", 1), ("bad_row", 2)]:
        assert any(line.split() == [reason, str(n)] for line in out.stdout.splitlines())


def test_cli_exits_0_when_every_row_is_good_and_help_names_the_codes(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"completion": "#### 4", "answer": "4"}) + "\n")
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.verify", str(path), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bad row" not in out.stderr, out.stderr
    assert (tmp_path / "in.graded.jsonl").is_file()
    helptext = subprocess.run([sys.executable, "-m", "stagewise_pl.verify", "--help"], capture_output=True, text=True,
                              timeout=120).stdout
    assert "Exit codes" in helptext and "3 some rows were bad" in helptext


def test_literal_answers_refuses_a_restated_expression_that_math_verify_would_evaluate():
    """The loophole GRPO found on the arithmetic task (docs/RESULTS.md): "The answer is 2+7-5" equals 4 for
    math-verify. With literal_answers a numeric gold needs a number (fractions included); other golds are as before."""
    plain, literal = get_verifier("math"), get_verifier("math", literal_answers=True)
    restated = ["The answer is 2+7-5", "The answer is 8 - 4 + 2 - 2", "The answer is: 2*2"]
    for completion in restated:
        assert plain.score(completion, "4").reason == "correct"
        assert literal.score(completion, "4").reason == "unevaluated" and literal.score(completion, "4").reward == 0.0
    for completion, gold in [("The answer is 4.", "4"), ("7-3=4", "4"), ("#### 1,234", "1234"),
                             ("The answer is -3", "-3"), ("\\boxed{\\frac{1}{2}}", "1/2"),
                             ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}")]:
        assert literal.score(completion, gold).reason == "correct", completion
    assert literal.score("The answer is 5", "4").reason == "wrong"
    cfg = load_config("smollm2", ["verifier.options={literal_answers: true}"]).verifier
    with make_verifier(cfg) as pool:
        verdicts = pool.score_many([("The answer is 2+7-5", "4"), ("The answer is 4", "4")])
    assert [v.reason for v in verdicts] == ["unevaluated", "correct"]  # verifier.options reach the grading workers
