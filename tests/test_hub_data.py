"""Data a user names by its hub name (data.source=hf data.path=openai/gsm8k data.subset=main), filters on loaded
problems (data.filter, eval.filter) and the dataset's own solutions as the teacher (teacher.name=dataset). No hub
access here: a local directory in the hub's layout (a dataset repository's parquet files and its README's configs,
rows in GSM8K's format written by the test) loads through the same datasets.load_dataset call, the datasets library
offline."""
from __future__ import annotations

import json

import pytest

from stagewise_pl.fit import main


def hub_layout(root, rows_by_split: dict, subset: str = "main"):
    """``root`` as a hub dataset repository: SUBSET/SPLIT-00000-of-00001.parquet and a README with its configs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / subset).mkdir(parents=True)
    for split, rows in rows_by_split.items():
        table = pa.table({key: [r[key] for r in rows] for key in rows[0]})
        pq.write_table(table, root / subset / f"{split}-00000-of-00001.parquet")
    files = "".join(f"  - split: {split}\n    path: {subset}/{split}-*\n" for split in rows_by_split)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {subset}\n  data_files:\n{files}---\n")
    return root


NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                        "How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}


def gsm8k_rows(n: int, offset: int) -> list[dict]:
    """``n`` rows in GSM8K's format (a question; a rationale with <<calculator>> annotations and ``#### answer``),
    1 to 4 calculator steps each, made here so the tests read no data they do not write."""
    rows = []
    for i in range(offset, offset + n):
        start, add, steps = 3 + i, 2 + i % 5, 1 + i % 4
        lines, total = [], start
        for _ in range(steps):
            lines.append(f"Then there are {total}+{add} = <<{total}+{add}={total + add}>>{total + add} marbles.")
            total += add
        rows.append({"question": f"Sam has {start} marbles and gets {add} more, {steps} times. How many now?",
                     "answer": "\n".join(lines) + f"\n#### {total}"})
    return rows


@pytest.fixture
def gsm8k_dir(tmp_path, monkeypatch):
    """40 training and 20 test rows in GSM8K's format, laid out as openai/gsm8k is on the hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return hub_layout(tmp_path / "gsm8k", {"train": [NATALIA] + gsm8k_rows(39, 0), "test": gsm8k_rows(20, 100)})


def data_cfg(**kw):
    from stagewise_pl.schema import DataConfig

    return DataConfig(**{"source": "hf", **kw})


def test_a_hub_layout_dataset_loads_by_name_subset_and_split(gsm8k_dir):
    from stagewise_pl.data.loaders import load_pool

    problems, report = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", split="train"))
    assert len(problems) == 40 and report.kept == 40
    p = problems[0]
    # the gsm8k format (from the name): the question, the number after ####, the rationale without <<...>>
    assert p.prompt.startswith("Natalia") and p.answer == "72" and "<<" not in p.solution
    assert p.solution.endswith("#### 72") and p.meta["calculator_steps"] == 2 and p.level == "2"
    test, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", split="test"))
    assert len(test) == 20 and test[0].id != problems[0].id


def test_two_local_directories_of_one_name_each_load_their_own_rows(tmp_path):
    """The datasets cache keys a local directory by its name and layout: a second directory called gsm8k (or the
    same one edited) must not be answered from the first one's cache, and the user's cache is not written."""
    from stagewise_pl.data.loaders import load_pool

    first = hub_layout(tmp_path / "a" / "gsm8k", {"train": gsm8k_rows(3, 0)})
    second = hub_layout(tmp_path / "b" / "gsm8k", {"train": [NATALIA] + gsm8k_rows(4, 0)})
    assert len(load_pool(data_cfg(path=str(first), subset="main"))[0]) == 3
    problems, _ = load_pool(data_cfg(path=str(second), subset="main"))
    assert len(problems) == 5 and problems[0].answer == "72"


def test_a_filter_keeps_the_short_problems_and_the_report_counts_what_it_dropped(gsm8k_dir):
    from stagewise_pl.data.loaders import load_pool

    every, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main"))
    short, report = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", filter="calculator_steps<=2"))
    expected = [p.id for p in every if p.meta["calculator_steps"] <= 2]
    assert [p.id for p in short] == expected and 0 < len(short) < len(every)
    assert report.filtered == {"dropped": len(every) - len(short)} and report.kept == len(short)
    assert f"filter calculator_steps<=2: kept {len(short)}, dropped {len(every) - len(short)}" in report.summary()
    both, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", filter="calculator_steps>=1, level<=1"))
    assert all(p.meta["calculator_steps"] == 1 for p in both)


def test_a_pool_without_the_measure_is_counted_not_silently_kept(tmp_path):
    from stagewise_pl.data.hub import apply_filter
    from stagewise_pl.data.problems import Problem

    problems = [Problem("a", "1+1", "2", "t"), Problem("b", "1+2", "3", "t", meta={"calculator_steps": 1})]
    kept, dropped = apply_filter(problems, "calculator_steps<=2")
    assert [p.id for p in kept] == ["b"] and dropped == {"dropped": 0, "no_calculator_steps": 1}


@pytest.mark.parametrize("text,message", [("steps<=2", "unknown measure 'steps'"),
                                          ("calculator_steps=<2", "expected MEASURE OP NUMBER"),
                                          ("level<=two", "expected MEASURE OP NUMBER")])
def test_a_bad_filter_is_refused_when_the_config_is_read(text, message):
    from stagewise_pl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("default", [f"data.filter={text}"])
    with pytest.raises(ConfigError, match=message):
        load_config("default", [f"eval.filter={text}"])


def test_a_hub_name_that_cannot_be_reached_says_which_and_what_to_do_offline(tmp_path, monkeypatch):
    from stagewise_pl.data.hub import HubError
    from stagewise_pl.data.loaders import load_pool

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubError, match=r"'openai/gsm8k' \(subset main, split train\).*data\.path"):
        load_pool(data_cfg(path="openai/gsm8k", subset="main"))


def test_hub_benchmarks_for_the_held_out_evaluation(gsm8k_dir):
    from stagewise_pl.config import ConfigError, load_config
    from stagewise_pl.data.hub import FORMAT_NAMES, HUB_FORMATS, HubRef, format_of, parse_benchmark
    from stagewise_pl.data.loaders import BENCHMARK_FORMATS, load_eval_benchmark

    assert set(FORMAT_NAMES) == set(BENCHMARK_FORMATS) and set(HUB_FORMATS.values()) <= set(BENCHMARK_FORMATS)

    assert parse_benchmark("hf:openai/gsm8k:main:test") == HubRef("openai/gsm8k", "main", "test")
    assert parse_benchmark("hf:HuggingFaceH4/MATH-500") == HubRef("HuggingFaceH4/MATH-500", "", "test")
    assert parse_benchmark("data/gsm8k_test.jsonl") is None
    assert format_of(HubRef("math-ai/amc23")) == "amc23" and format_of(HubRef("/x/gsm8k")) == "gsm8k"
    name, problems, report = load_eval_benchmark(f"hf:{gsm8k_dir}:main:test", 0, "calculator_steps<=2")
    assert name == "gsm8k_test" and problems and all(p.meta["calculator_steps"] <= 2 for p in problems)
    assert report.filtered["dropped"] == 20 - len(problems)
    with pytest.raises(ConfigError, match="no benchmark format is known for 'someone/unknown'"):
        load_config("default", ["eval.benchmarks=[hf:someone/unknown::test]"])
    with pytest.raises(ConfigError, match="hf:NAME"):
        load_config("default", ["eval.benchmarks=['hf::a:b:c']"])


# ------------------------------------------------------------------ the dataset's solutions as the teacher
def test_the_dataset_teacher_renders_the_solution_in_the_answer_format_asked_for(gsm8k_dir):
    from stagewise_pl.data.loaders import load_pool
    from stagewise_pl.teachers.base import TeacherError, make_teacher
    from stagewise_pl.teachers.dataset import render_solution

    problems, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main"))
    teacher = make_teacher("dataset", {"answer_line": "The answer is {answer}."})
    (trace,), = teacher.traces(problems[:1])
    assert trace.endswith("\nThe answer is 72.") and "####" not in trace and "<<" not in trace
    assert trace.startswith("Natalia sold 48/2 = 24 clips in May.")
    assert make_teacher("dataset", {}).traces(problems[:1])[0][0].endswith("#### 72")  # no answer_line: as it is
    assert render_solution("x = 3", "3", "Answer: {answer}") == "x = 3\nAnswer: 3"  # no #### line: appended
    with pytest.raises(TeacherError, match="no solution in the pool"):
        teacher.traces([problems[0].__class__("q", "1+1", "2", "t")])
    with pytest.raises(TeacherError, match="not critiques"):
        teacher.critique(problems[0], "wrong")
    with pytest.raises(TeacherError, match="must contain"):
        make_teacher("dataset", {"answer_line": "The answer."})


def test_a_run_teaches_a_hub_pool_from_its_own_solutions(tmp_path, gsm8k_dir, fast_overrides, capsys):
    """Bridge SFT (raw) and the hpt peer on the GSM8K pool, the dataset's solutions as their traces: counted as
    teacher texts; the pool's filter and the eval filter in the run's log."""
    run_dir = tmp_path / "run"
    assert main(fast_overrides + [
        f"run.dir={run_dir}", "data.source=hf", f"data.path={gsm8k_dir}", "data.subset=main",
        "data.filter=calculator_steps<=3", "data.target=reference", "teacher.name=dataset",
        "teacher.args={answer_line: 'The answer is {answer}.'}", "bridge.strategy=raw", "bridge.fallback=raw",
        "phases=[{name: b, kind: bridge_sft, select: all, limit: 8, steps: 2, lr: 1e-4},"
        " {name: h, kind: hpt, select: all, steps: 1, lr: 1e-4}]", "grpo.prompts_per_step=2",
        "grpo.num_generations=2", "grpo.max_new_tokens=8", "eval.k=0", "eval.split=''",
        f"eval.benchmarks=[hf:{gsm8k_dir}:main:test]", "eval.filter=calculator_steps<=2", "eval.max_new_tokens=8",
        "trainer.max_length=512"]) == 0
    done = json.loads((run_dir / "state.json").read_text())["completed"]
    assert done["b"]["teacher_texts"] == 8 and done["h"]["teacher_traces"] > 0  # failed groups: traces
    results = json.loads((run_dir / "eval" / "h.json").read_text())
    assert set(results) == {"gsm8k_test"} and results["gsm8k_test"]["by_level"]["all"]["n"] < 20
    assert "problems (filter calculator_steps<=3: kept" in capsys.readouterr().out


def test_skip_leaves_out_the_first_problems_so_two_slices_are_disjoint(gsm8k_dir):
    from stagewise_pl.data.loaders import load_pool

    first, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", limit=10))
    rest, report = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", skip=10, limit=10))
    every, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", limit=20))
    assert [p.id for p in first + rest] == [p.id for p in every] and report.kept == 10
    assert "after the first 10" in report.summary()
    after, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", skip=10))
    short, _ = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", skip=10, filter="calculator_steps<=2"))
    ids = {p.id for p in short}
    assert ids and ids <= {p.id for p in after} and not ids & {p.id for p in first}


def test_reference_targets_take_the_same_answer_line_as_the_dataset_teacher(gsm8k_dir):
    from stagewise_pl.data.examples import sft_target
    from stagewise_pl.data.loaders import load_pool
    from stagewise_pl.teachers.base import make_teacher

    p = load_pool(data_cfg(path=str(gsm8k_dir), subset="main", limit=1))[0][0]
    line = "The answer is {answer}."
    assert sft_target(p, "reference").endswith("#### 72")  # as written
    assert sft_target(p, "reference", line) == make_teacher("dataset", {"answer_line": line}).traces([p])[0][0]
