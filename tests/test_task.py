import pytest

from stagewise_pl.config import load_config
from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level
from stagewise_pl.verify import get_verifier


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask.from_config(load_config("default", ["task.train_per_level=300"]).task)


def test_deterministic_by_seed(task):
    again = ArithmeticTask.from_config(load_config("default", ["task.train_per_level=300"]).task)
    assert [p.prompt for p in again.split("train")] == [p.prompt for p in task.split("train")]
    assert [p.prompt for p in again.split("test")] == [p.prompt for p in task.split("test")]
    other = ArithmeticTask(task.levels, seed=task.seed + 1, train_per_level=300, test_per_level=50)
    assert [p.prompt for p in other.split("test")] != [p.prompt for p in task.split("test")]


def test_splits_never_overlap(task):
    train, test = {p.prompt for p in task.split("train")}, {p.prompt for p in task.split("test")}
    assert train and test and not train & test
    assert len(test) == len(task.split("test"))  # no duplicates within a split


def test_levels_follow_the_knob(task):
    for p in task.split("test"):
        level = task.levels[p.meta["level"] - 1]
        operands = [int(x) for x in p.prompt.replace("-", "+").split("+")]
        assert len(operands) == level.steps + 1 and max(operands) <= level.max_operand
        assert int(p.answer) >= 0


def test_teacher_traces_and_reference_are_graded_correct(task):
    verifier = get_verifier("exact")
    for p in task.split("test"):
        assert verifier.score(p.teacher_traces[0], p.answer).reason == "correct"
        assert verifier.score(p.solution, p.answer).reason == "correct"
        assert task.first_error(p.prompt, p.teacher_traces[0]) is None
        assert len(p.teacher_traces[0].splitlines()) == task.levels[p.meta["level"] - 1].steps + 1


@pytest.mark.parametrize("solution,step,kind,value", [
    ("17+5=23\n23-9=14\n#### 14", 0, "wrong_value", 22),          # arithmetic slip in step 1
    ("17+5=22\n22-9=12\n#### 12", 1, "wrong_value", 13),          # slip in step 2
    ("17+5=22\n22+9=31\n#### 31", 1, "wrong_operands", 13),       # wrong operator
    ("17+5=22\n17-9=8\n#### 8", 1, "wrong_operands", 13),         # did not carry the running value
    ("17+5=22\n#### 22", 1, "missing_step", 13),                  # stopped early
    ("17+5=22\n22-9=13\n#### 31", 2, "wrong_final", 13),          # steps right, answer wrong
    ("17+5=22\n22-9=13", 2, "no_answer", 13),                     # no answer line
    ("", 0, "missing_step", 22),
])
def test_first_wrong_step(solution, step, kind, value):
    error = ArithmeticTask([Level(2, 20)]).first_error("17+5-9", solution)
    assert (error.step, error.kind, error.correct_value) == (step, kind, value)
    assert error.describe()


def test_subtraction_never_goes_negative():
    task = ArithmeticTask([Level(6, 99)], seed=3, train_per_level=200, test_per_level=10)
    from stagewise_pl.tasks.arithmetic import evaluate, parse_expression

    for p in task.split("train"):
        assert min(evaluate(*parse_expression(p.prompt))) >= 0


def test_max_new_tokens_covers_every_trace(task, tiny):
    _, tokenizer = tiny
    longest = max(len(tokenizer(p.teacher_traces[0])["input_ids"]) for p in task.split("train"))
    assert task.max_new_tokens() >= longest + 1  # + EOS


# ------------------------------------------------------------------ the skill levels (conf/skills.yaml)
def skill_task(**kw):
    return ArithmeticTask([Level(1, 9), Level(2, 9)], train_per_level=300, test_per_level=40,
                          skill_levels=[Level(1, 60, 1), Level(3, 9, 1)], **kw)


def test_a_product_is_written_out_as_repeated_addition_of_the_running_value():
    task = skill_task()
    assert task.trace("7*3") == "7+7=14\n14+7=21\n#### 21"
    assert task.trace("4+3*2-5") == "4+3=7\n7+7=14\n14-5=9\n#### 9"  # left to right: (4+3)*2-5
    assert task.steps_of("4+3*3-5") == 4 and task.steps_of("4+3-5") == 2
    assert task.chunked_trace("4+3*3-5", [2, 2]) == "4+3+7=14\n14+7-5=16\n#### 16"
    assert task.reference_solution("7*3") == "7*3 = 21\n#### 21"


def test_the_critic_checks_the_written_out_steps():
    task = skill_task()
    assert task.first_error("4+3*3", "4+3=7\n7+7=14\n14+7=21\n#### 21") is None
    error = task.first_error("4+3*3", "4+3=7\n7*3=21\n#### 21")  # the student's guess at a step it never saw
    assert (error.step, error.kind, error.expected) == (1, "wrong_operands", "7+7=14")
    error = task.first_error("4+3*3", "4+3=7\n7+7=14\n14+7=22\n#### 22")
    assert (error.step, error.kind, error.correct_value) == (2, "wrong_value", 21)


def test_skill_levels_come_after_the_plain_ones_with_the_same_held_out_discipline():
    task, plain = skill_task(), ArithmeticTask([Level(1, 9), Level(2, 9)], train_per_level=300, test_per_level=40)
    train, test = task.split("train"), task.split("test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    skill = [p for p in train + test if p.meta.get("skill")]
    assert {p.level for p in skill} == {"3", "4"} and all("*" in p.prompt for p in skill)
    assert all("*" not in p.prompt for p in train + test if not p.meta.get("skill"))
    # the plain levels draw exactly the problems of the task without skills; plain() is that task
    assert [p.prompt for p in test if p.level in ("1", "2")] == [p.prompt for p in plain.split("test")]
    assert [p.prompt for p in task.plain().split("train")] == [p.prompt for p in plain.split("train")]
    assert len([p for p in test if p.level == "3"]) == 40  # 60 x 2 products: 40 held out, the rest to train on
    assert len([p for p in train if p.level == "3"]) == 120 - 40
    verifier = get_verifier("exact")
    assert all(verifier.score(p.teacher_traces[0], p.answer).reward == 1.0 for p in skill)
    assert task.max_new_tokens() >= max(len(p.teacher_traces[0]) for p in skill)


def test_the_base_model_key_ignores_the_skill_levels_and_a_plain_level_cannot_multiply():
    from stagewise_pl.config import ConfigError
    from stagewise_pl.models.base import base_key

    assert base_key(load_config("skills")) == base_key(load_config("default")) == "f89a1f374c90afb1"
    with pytest.raises(ConfigError, match="levels.0.times"):
        load_config("default", ["task.levels.0.times=1"])
    with pytest.raises(ConfigError, match="skill_levels.0.times"):
        load_config("default", ["task.skill_levels=[{steps: 1, max_operand: 9, times: 2}]"])


def test_the_programmatic_teacher_writes_and_checks_skill_problems():
    from stagewise_pl.teachers.programmatic import ProgrammaticTeacher

    task = skill_task()
    problem = next(p for p in task.split("train") if p.meta.get("skill") and p.level == "4")
    teacher = ProgrammaticTeacher(task, style="chunked", ops_per_line=2)
    trace = teacher.traces([problem])[0][0]
    assert get_verifier("exact").score(trace, problem.answer).reward == 1.0 and "*" not in trace
    assert "Verdict: incorrect" in teacher.critique(problem, "1+1=2\n#### 2")
