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
