"""Bridge strategies (keep or fall back, bad candidates counted), CFT data building, the weighted SFT loss."""
from collections import Counter

import pytest
import torch

from stagewise_pl.bridge import BridgeContext, MinNLLSelect, PrefixHint, make_strategy, run_bridge
from stagewise_pl.cft import build_cft, kept_prefix
from stagewise_pl.config import BridgeConfig, CFTConfig, load_prompts
from stagewise_pl.data.problems import Problem
from stagewise_pl.rollout.base import RolloutBatch
from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level
from stagewise_pl.teachers import TEACHERS, TeacherError
from stagewise_pl.verify import make_verifier
from stagewise_pl.config import VerifierConfig

PROMPTS = load_prompts("default")


class ScriptedEngine:
    """Answers each rendered prompt with scripted completions (a function of the prompt), n per prompt."""

    def __init__(self, script):
        self.script, self.prompts = script, []

    def generate(self, prompts, sampling, desc=""):
        self.prompts += prompts
        texts = [t for p in prompts for t in self.script(p, sampling.n)]
        return RolloutBatch(n=sampling.n, prompt_ids=[[0]] * len(prompts), completion_ids=[[0]] * len(texts),
                            texts=texts, finish_reasons=["stop"] * len(texts))


class FixedTeacher:
    """Traces and simplifications from dicts; a missing entry raises like a teacher that cannot answer."""

    def __init__(self, traces, simplified=None):
        self._traces, self._simplified = traces, simplified or {}

    def traces(self, problems, n=1):
        return [self._traces.get(p.id, [])[:n] for p in problems]

    def simplify(self, problem, trace):
        if problem.id not in self._simplified:
            raise TeacherError(f"no simplification for {problem.id}")
        return self._simplified[problem.id]


class Context(BridgeContext):
    """The real judging and templates; NLL = target length (so 'shorter is more likely' is checkable)."""

    def _score(self, problems, targets):
        return [float(len(t)) for t in targets]


class Tok:
    chat_template = None


def context(engine=None, teacher=None, **settings):
    verifier = make_verifier(VerifierConfig(name="exact"))
    return Context(None, Tok(), engine, verifier, teacher, PROMPTS, BridgeConfig(**settings), max_new_tokens=32)


PROBLEMS = [Problem(id=f"p{i}", prompt=f"{i}+1+1", answer=str(i + 2), source="t") for i in range(4)]
RAW = {p.id: [f"{p.prompt}={p.answer}\n#### {p.answer}"] for p in PROBLEMS}


def test_student_rewrite_keeps_a_verified_candidate_that_does_not_mention_the_reference():
    # p0: first candidate wrong, second mentions the reference, third right -> kept (the third)
    # p1: all bad (empty, no answer, wrong) -> raw; p2: right at once; p3: its raw trace is wrong and no
    # candidate verifies -> dropped
    answers = {"0": ["#### 5", "By the reference: #### 2", "0+1=1\n1+1=2\n#### 2"],
               "1": ["", "no idea", "#### 9"], "2": ["2+1=3\n3+1=4\n#### 4"] * 3, "3": ["#### 0"] * 3}
    engine = ScriptedEngine(lambda prompt, n: answers[prompt.split("+")[0][-1]][:n])
    raw = dict(RAW, p3=["3+1+1=7\n#### 7"])
    items, summary = run_bridge(make_strategy(BridgeConfig(samples=3)), context(engine, FixedTeacher(raw), samples=3),
                                PROBLEMS)
    by = {it.problem_id: it for it in items}
    assert by["p0"].kept and by["p0"].target == "0+1=1\n1+1=2\n#### 2"
    assert not by["p1"].kept and by["p1"].target == RAW["p1"][0]
    assert by["p2"].kept and by["p3"].target is None and by["p3"].reason == "wrong"
    assert "Reference solution:\n0+1+1=2" in engine.prompts[0]  # the student saw the teacher trace
    assert summary["candidates"] == {"accepted": 1 + 3, "empty": 1, "mentions_reference": 1, "no_answer": 1,
                                     "wrong": 1 + 1 + 3}
    assert (summary["kept"], summary["fell_back_to_raw"], summary["dropped"], summary["acceptance"]) == (2, 1, 1, 0.5)
    assert summary["raw_verdicts"] == {"accepted": 3, "wrong": 1}
    items, summary = run_bridge(make_strategy(BridgeConfig()), context(engine, FixedTeacher(raw), samples=3,
                                                                       fallback="drop"), PROBLEMS)
    assert [it.target is not None for it in items] == [True, False, True, False] and summary["dropped"] == 2


def test_teacher_simplify_keeps_only_verified_simplifications_and_counts_bad_ones():
    problems = PROBLEMS + [Problem(id="p4", prompt="4+1+1", answer="6", source="t")]
    raw = dict(RAW, p4=["4+1+1=6\n#### 6"])
    simplified = {"p0": "0+1=1\n1+1=2\n#### 2", "p1": "", "p2": "2+1=3, then 4", "p4": "4+1=5\n5+1=7\n#### 7"}
    items, summary = run_bridge(make_strategy(BridgeConfig(strategy="teacher_simplify")),
                                context(teacher=FixedTeacher(raw, simplified)), problems)  # p3: the teacher fails
    assert [it.kept for it in items] == [True, False, False, False, False]
    assert [it.target for it in items[1:]] == [raw[f"p{i}"][0] for i in (1, 2, 3, 4)]  # fell back to raw
    assert [it.reason for it in items[1:]] == ["empty", "no_answer", "teacher_failed", "wrong"]
    assert summary["candidates"] == {"accepted": 1, "empty": 1, "no_answer": 1, "teacher_failed": 1, "wrong": 1}


def test_prefix_hint_gives_the_first_lines_and_keeps_the_whole_if_verified():
    assert PrefixHint.prefix("a\nb\nc\nd\n#### 1", 0.5) == "a\nb\n"
    assert PrefixHint.prefix("#### 1", 0.5) == ""  # the answer line is never given away
    trace = "5+1=6\n6+1=7\n7+1=8\n8+1=9\n#### 9"
    problem = Problem(id="q", prompt="5+1+1+1+1", answer="9", source="t")
    engine = ScriptedEngine(lambda prompt, n: ["7+1=8\n8+1=9\n#### 9"] if prompt.endswith("6+1=7\n") else ["x"])
    items, summary = run_bridge(PrefixHint(), context(engine, FixedTeacher({"q": [trace]}), samples=1,
                                                      prefix_fraction=0.5), [problem])
    assert engine.prompts[0].endswith("5+1+1+1+1\n5+1=6\n6+1=7\n")
    assert items[0].kept and items[0].target == trace
    engine = ScriptedEngine(lambda prompt, n: ["8+1=10\n#### 10"])
    items, _ = run_bridge(PrefixHint(), context(engine, FixedTeacher({"q": [trace]}), samples=1), [problem])
    assert not items[0].kept and items[0].target == trace and items[0].reason == "wrong"


def test_min_nll_select_takes_the_most_likely_verified_trace():
    traces = {"p0": ["0+1+1=2\n#### 2 (long explanation)", "0+1+1=2\n#### 2", "#### 3"],  # the short one wins
              "p1": ["#### 7", "#### 8"]}  # no candidate verifies: nothing to fall back on either
    items, summary = run_bridge(MinNLLSelect(), context(teacher=FixedTeacher(traces), candidates=3), PROBLEMS[:2])
    assert items[0].kept and items[0].target == "0+1+1=2\n#### 2"
    assert items[0].nll_target < items[0].nll_raw
    assert items[1].target is None and items[1].reason == "no_verified_candidate" and summary["dropped"] == 1


def test_raw_strategy_is_the_teacher_trace_and_a_teacher_with_nothing_raises():
    items, summary = run_bridge(make_strategy(BridgeConfig(strategy="raw")), context(teacher=FixedTeacher(RAW)),
                                PROBLEMS)
    assert [it.target for it in items] == [RAW[p.id][0] for p in PROBLEMS] and summary["acceptance"] == 0.0
    with pytest.raises(TeacherError, match="no trace for any of 4 problems"):
        run_bridge(make_strategy(BridgeConfig(strategy="raw")), context(teacher=FixedTeacher({})), PROBLEMS)


def test_programmatic_teacher_chunked_traces_simplify_and_repair():
    task = ArithmeticTask([Level(5, 30)], seed=3, train_per_level=20, test_per_level=2)
    teacher = TEACHERS.get("programmatic")(task, style="chunked", ops_per_line=2)
    verifier = make_verifier(VerifierConfig(name="exact"))
    for p in task.split("train"):
        traces = teacher.traces([p], n=4)[0]
        assert traces[0].count("\n") == 3 and len(set(traces)) == len(traces)  # 5 ops in lines of 2, 2, 1
        assert all(verifier.score(t, p.answer).reason == "correct" for t in traces)
        assert teacher.simplify(p, traces[0]) == p.teacher_traces[0]
        wrong = p.teacher_traces[0].replace("=", "=1", 1)
        repaired = teacher.repair(p, wrong, teacher.critique(p, wrong))
        assert repaired == p.teacher_traces[0]
    with pytest.raises(TeacherError, match="style 'fancy'"):
        TEACHERS.get("programmatic")(task, style="fancy")


def test_cft_items_from_failures():
    """Diagnoses kept only with a verdict of incorrect; repairs (the student continuing before the named step)
    kept only if verified; traces through the bridge; weights 0 leave a kind out."""
    task = ArithmeticTask([Level(3, 9)], seed=5, train_per_level=6, test_per_level=1)
    teacher = TEACHERS.get("programmatic")(task)
    problems = task.split("train")[:3]
    failures = {}
    for p in problems:
        lines = p.teacher_traces[0].splitlines()
        left, value = lines[1].rsplit("=", 1)
        failures[p.id] = ["\n".join(lines[:1] + [f"{left}={int(value) + 1}"] + lines[2:])]  # step 2 is wrong

    def student(prompt, n):  # continues correctly only from the kept first step of the first problem
        p0 = problems[0].teacher_traces[0].splitlines()
        return ["\n".join(p0[1:])] if prompt.endswith(p0[0] + "\n") else ["#### 0"]

    class Critic:
        def critique(self, problem, failed):
            if problem.id == problems[2].id:
                return "Step 2 is wrong."  # no verdict line: not kept
            return teacher.critique(problem, failed)

    engine = ScriptedEngine(student)
    ctx = context(engine, teacher)
    items, summary = build_cft(ctx, Critic(), teacher, make_strategy(BridgeConfig(strategy="teacher_simplify")),
                               problems, failures, CFTConfig(repair_samples=1))
    kinds = Counter(it.kind for it in items)
    assert kinds == {"diagnosis": 2, "repair": 1, "trace": 3}
    assert summary["outcomes"]["diagnosis"] == {"accepted": 2, "no_verdict": 1}
    assert summary["outcomes"]["repair"] == {"accepted": 1, "no_diagnosis": 1, "wrong": 1}
    repair = next(it for it in items if it.kind == "repair")
    assert repair.target == problems[0].teacher_traces[0] and "Critique:\nStep 2 is wrong" in repair.prompt
    diagnosis = next(it for it in items if it.kind == "diagnosis")
    assert failures[diagnosis.problem_id][0] in diagnosis.prompt and diagnosis.target.endswith("Verdict: incorrect")
    items, _ = build_cft(context(engine, teacher), Critic(), teacher, make_strategy(BridgeConfig(strategy="raw")),
                         problems, failures, CFTConfig(weights={"diagnosis": 0.0, "repair": 0.0, "trace": 1.0}))
    assert {it.kind for it in items} == {"trace"}
    assert kept_prefix("a\nb\nc\n#### 3", "Step 3 is wrong", r"Step (\d+)") == "a\nb\n"
    assert kept_prefix("a\nb", "no step named", r"Step (\d+)") == ""


def test_weighted_sft_loss(tiny):
    from stagewise_pl.data.sft import Example, pack_collate, pad_collate
    from stagewise_pl.losses import IGNORE_INDEX
    from stagewise_pl.models.forward import sft_loss

    policy, _ = tiny
    a = Example([5, 6, 7, 8], [IGNORE_INDEX, 6, 7, 8])
    b = Example([9, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, 11])
    plain, count = sft_loss(policy, pad_collate([a, b], 0), "torch")
    assert "loss_weights" not in pad_collate([a, b], 0) and int(count) == 4
    ones, _ = sft_loss(policy, dict(pad_collate([a, b], 0), loss_weights=torch.ones(2, 4)), "torch")
    torch.testing.assert_close(ones, plain)
    b2 = Example(b.input_ids, b.labels, weight=3.0)
    for collate in (lambda ex: pad_collate(ex, 0), lambda ex: pack_collate(ex, 0, 16)):
        weighted, _ = sft_loss(policy, collate([a, b2]), "torch")
        only_b, _ = sft_loss(policy, collate([b]), "torch")
        only_a, _ = sft_loss(policy, collate([a]), "torch")
        # token mean over 4 tokens: a has 3, b has 1 (weighted 3)
        torch.testing.assert_close(weighted, (3 * only_a + 3 * only_b) / 4, rtol=1e-4, atol=1e-5)


def test_bridge_and_cft_settings_are_checked():
    from stagewise_pl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="bridge.prefix_fraction"):
        load_config("default", ["bridge.prefix_fraction=1.5"])
    with pytest.raises(ConfigError, match="cft.weights"):
        load_config("default", ["cft.weights={diagnosis: -1, repair: 1, trace: 1}"])
    with pytest.raises(ConfigError, match="cft.step_pattern"):
        load_config("default", ["cft.step_pattern=Step"])
    with pytest.raises(ConfigError, match="prompts=nope"):
        load_prompts("nope")
    assert {"bridge_rewrite", "cft_diagnosis", "cft_repair", "teacher_trace"} <= set(PROMPTS)
    assert {"bridge_rewrite", "cft_diagnosis", "cft_repair"} <= set(load_prompts("synthetic"))
