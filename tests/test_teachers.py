"""Teachers (groundwork of Bridge+CFT): the programmatic teacher's traces and diagnoses, trace files."""
import json
import random

import pytest

from stagewise_pl.data.problems import BadRowError, Problem
from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level
from stagewise_pl.teachers import TEACHERS, TeacherError, VERDICT_CORRECT, VERDICT_INCORRECT
from stagewise_pl.teachers.base import verdict_of


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask([Level(1, 9), Level(3, 40), Level(6, 60)], seed=7, train_per_level=30, test_per_level=5)


def corrupt(trace: str, rng: random.Random) -> tuple[str, int]:
    """A wrong solution: one step's value changed (later steps carry the wrong value on); its step index."""
    lines = trace.splitlines()
    steps = [i for i, ln in enumerate(lines) if "=" in ln and not ln.startswith("####")]
    k = rng.choice(steps)
    left, value = lines[k].rsplit("=", 1)
    lines[k] = f"{left}={int(value) + rng.choice([-3, -1, 1, 2, 10])}"
    return "\n".join(lines), steps.index(k)


def test_programmatic_traces_and_diagnoses_name_the_first_wrong_step(task):
    teacher = TEACHERS.get("programmatic")(task)
    problems = task.split("train")
    traces = teacher.traces(problems[:5], n=3)
    assert [t for (t,) in traces] == [p.teacher_traces[0] for p in problems[:5]]  # one exact trace each
    rng = random.Random(0)
    checked = 0
    for p in problems[:50]:
        wrong, step = corrupt(p.teacher_traces[0], rng)
        critique = teacher.critique(p, wrong)
        assert verdict_of(critique) == VERDICT_INCORRECT
        assert f"Step {step + 1} is wrong" in critique, (p.prompt, wrong, critique)
        checked += 1
    assert checked == 50
    assert verdict_of(teacher.critique(problems[0], problems[0].teacher_traces[0])) == VERDICT_CORRECT
    no_answer = teacher.critique(problems[0], problems[0].teacher_traces[0].split("####")[0])
    assert "never states a final answer" in no_answer and verdict_of(no_answer) == VERDICT_INCORRECT
    with pytest.raises(TeacherError, match="problem x: not an expression"):
        teacher.critique(Problem(id="x", prompt="What is love?", answer="1", source="t"), "1")


def test_trace_file_teacher(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"id": "a", "traces": ["t1", "t2"]}) + "\n\n"
                    + json.dumps({"id": 7, "trace": "t"}) + "\n")
    teacher = TEACHERS.get("trace_file")(path)
    problems = [Problem(id="a", prompt="p", answer="1", source="s"),
                Problem(id="7", prompt="q", answer="2", source="s")]
    assert teacher.traces(problems, n=1) == [["t1"], ["t"]] and teacher.traces(problems[:1], n=5) == [["t1", "t2"]]
    with pytest.raises(TeacherError, match="no trace for 1 problems, e.g. \\['b'\\]"):
        teacher.traces([Problem(id="b", prompt="p", answer="1", source="s")])
    with pytest.raises(TeacherError, match="not critiques"):
        teacher.critique(problems[0], "x")
    for body, reason in [("{nope\n", ":1: invalid_json"), ("[1]\n", ":1: not_an_object"),
                         ('{"traces": ["t"]}\n', ":1: needs an 'id'"),
                         ('{"id": "a", "traces": [""]}\n', ":1: needs 'traces'"),
                         ('{"id": "a", "trace": "t"}\n{"id": "a", "trace": "u"}\n',
                          ":2: problem id 'a' appears twice")]:
        path.write_text(body)
        with pytest.raises(BadRowError, match=reason):
            TEACHERS.get("trace_file")(path)
    with pytest.raises(TeacherError, match="does not exist"):
        TEACHERS.get("trace_file")(tmp_path / "missing.jsonl")
