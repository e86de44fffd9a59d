import json

import pytest

from conftest import benchmarks_dir
from stagewise_pl.data.loaders import BENCHMARK_FORMATS, load_benchmark, load_hf, load_jsonl, load_pool
from stagewise_pl.data.problems import BadRowError

GOOD = {"prompt": "1+1", "answer": "2"}


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def row(**kw) -> bytes:
    return json.dumps(kw).encode()


BAD_ROWS = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (row(prompt="1+1"), "no_answer"),
    (row(prompt="1+1", answer=None), "no_answer"),
    (row(prompt="", answer="2"), "no_prompt"),
    (row(prompt="   ", answer="2"), "no_prompt"),
    (row(prompt=["list"], answer="2"), "bad_type"),
    (b'{"prompt": "\xff\xfe", "answer": "1"}', "invalid_utf8"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_bad_row_fails_with_file_and_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "pool.jsonl", [row(**GOOD), bad, row(prompt="2+2", answer="4")])
    with pytest.raises(BadRowError) as err:
        load_jsonl(path)
    assert err.value.reason == reason
    assert f"{path}:2" in str(err.value)


def test_skip_counts_per_reason_and_keeps_good_rows(tmp_path):
    lines = [row(prompt=f"{i}+1", answer=str(i + 1), id=f"p{i}") for i in range(20)]
    lines[3] = b"{broken"
    lines[7] = row(prompt="x", answer=None, id="p7")
    lines[9] = row(prompt="dup", answer="1", id="p0")
    path = write_lines(tmp_path / "pool.jsonl", lines)
    problems, report = load_jsonl(path, fields={"prompt": "prompt", "answer": "answer", "id": "id"},
                                  on_bad_row="skip", max_bad_fraction=0.5)
    assert len(problems) == 17 and report.kept == 17
    assert dict(report.skipped) == {"invalid_json": 1, "no_answer": 1, "duplicate_id": 1}
    assert report.examples["duplicate_id"] == [f"{path}:10"]
    assert [p.id for p in problems][:3] == ["p0", "p1", "p2"]


def test_abort_above_bad_fraction(tmp_path):
    path = write_lines(tmp_path / "pool.jsonl", [row(**GOOD), b"{x", b"{y", row(prompt="3", answer="3")])
    with pytest.raises(BadRowError, match="too_many_bad_rows|2 of 4 rows are bad"):
        load_jsonl(path, on_bad_row="skip", max_bad_fraction=0.25)


def test_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row(**GOOD) + b"\r\n\r\n" + row(prompt="2+2", answer=4) + b"\r\n")
    problems, _ = load_jsonl(path)
    assert [(p.prompt, p.answer) for p in problems] == [("1+1", "2"), ("2+2", "4")]
    assert problems[1].id == "pool-3"  # ids default to <stem>-<line>


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_jsonl("/nonexistent/pool.jsonl")


def test_hf_dataset_from_local_files(tmp_path):
    import datasets

    data = {"question": ["1+2", "3+4"], "gold": ["3", "7"]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "saved"))
    fields = {"prompt": "question", "answer": "gold"}
    problems, report = load_hf(tmp_path / "saved", "train", fields)
    assert [p.answer for p in problems] == ["3", "7"] and report.kept == 2
    path = write_lines(tmp_path / "rows.jsonl", [row(question="5+5", gold="10"), row(question="6", gold=None)])
    with pytest.raises(BadRowError, match=r"rows.jsonl\[train\]:2"):
        load_hf(path, "train", fields)


def test_synthetic_pool_from_config():
    from stagewise_pl.config import load_config
    from stagewise_pl.tasks.arithmetic import ArithmeticTask

    cfg = load_config("default", ["task.train_per_level=10", "data.limit=25"])
    problems, report = load_pool(cfg.data, ArithmeticTask.from_config(cfg.task))
    assert len(problems) == 25 and report.kept == 25


EXPECTED_ROWS = {"math500": 500, "gsm8k_test": 1319, "gsm8k_train": 7473, "aime24": 30, "amc23": 40,
                 "minerva_math": 272, "olympiadbench": 675}


@pytest.mark.parametrize("stem", sorted(EXPECTED_ROWS))
def test_every_benchmark_file_maps_onto_the_schema(stem):
    path = benchmarks_dir() / f"{stem}.jsonl"
    problems, report = load_benchmark(path)
    assert len(problems) == EXPECTED_ROWS[stem] and not report.skipped
    assert all(p.prompt.strip() and p.answer.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)


def test_benchmark_gold_answers():
    base = benchmarks_dir()
    gsm = load_benchmark(base / "gsm8k_test.jsonl", limit=3)[0]
    assert gsm[0].answer == "18" and "<<" not in gsm[0].solution
    assert load_benchmark(base / "amc23.jsonl", limit=1)[0][0].answer == "27"  # 27.0 in the file
    minerva = load_benchmark(base / "minerva_math.jsonl", limit=1)[0][0]
    assert minerva.answer in minerva.solution and "\\boxed" not in minerva.answer
    olympiad = load_benchmark(base / "olympiadbench.jsonl", limit=5)[0]
    assert all(isinstance(p.meta["is_multiple_answer"], bool) for p in olympiad)


def test_benchmark_format_from_name_or_config(tmp_path):
    path = write_lines(tmp_path / "mystery.jsonl", [row(question="q", answer="x #### 5")])
    with pytest.raises(ValueError, match="cannot tell the benchmark format"):
        load_benchmark(path)
    assert load_benchmark(path, fmt="gsm8k")[0][0].answer == "5"
    assert set(BENCHMARK_FORMATS) >= {"math500", "gsm8k", "aime24", "amc23", "minerva_math", "olympiadbench"}
