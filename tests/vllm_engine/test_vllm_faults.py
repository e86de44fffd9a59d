"""A rollout engine that dies in the middle of a GRPO phase (marker vllm; .ci/run_vllm runs it in its own venv).

vLLM's engine lives in the training process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the one-device ``uni`` executor), so
"the engine's process killed" is the run killed during a rollout (fault ``engine_generate``), and an engine that dies
under a living run is its engine core shut down before a generation call (fault ``engine_dead``), which then fails as
it does in vLLM when its core is gone. Either way the run stops with its last checkpoint (the second with exit 8 and
an error that says the vLLM engine failed, in which call), and a resume, with a new engine, ends as a run that was
never interrupted: the same weights, ledger, curves and routing."""
import os

import pytest

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment (see .ci/run_vllm)")

from helpers import fit, outcome, resume  # noqa: E402

# generation calls: 1 the canary as the phase takes the engine, then one per rollout step (each after a push)
GRPO = ["rollout.engine=vllm", "rollout.max_model_len=256", "eval.k=0", "eval.before=false",
        "phases=[{name: g, kind: grpo, steps: 4, lr: 1e-3}]", "grpo.prompts_per_step=4", "grpo.num_generations=4",
        "grpo.levels=[1,2]", "grpo.drop_flat_groups=false", "trainer.checkpoint_every_n_steps=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import fast

    cache = tmp_path_factory.mktemp("vllm-faults-cache")
    args = fast(cache) + GRPO
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = fit(args + [f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stderr[-4000:]
    return args, outcome(run_dir)


def test_an_engine_core_that_dies_stops_the_run_clearly_and_a_resume_ends_as_an_uninterrupted_run(straight, tmp_path,
                                                                                                   reliability):
    args, want = straight
    run_dir = tmp_path / "run"
    out = fit(args + [f"run.dir={run_dir}"], env_extra={"STAGEWISE_FAULT": "engine_dead#3"})
    assert out.returncode == 8, out.stderr[-4000:]
    assert "the vLLM engine failed while generating" in out.stderr and "resume=last" in out.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert outcome(run_dir) == want
    reliability("vLLM's engine core dead before the 2nd rollout step of a GRPO phase", "engine_dead#3",
                "exit 8 naming the engine and the call; resume=last with a new engine = uninterrupted run")


def test_a_run_killed_inside_the_engines_generation_resumes_to_the_same_end(straight, tmp_path, reliability):
    args, want = straight
    run_dir = tmp_path / "run"
    out = fit(args + [f"run.dir={run_dir}"], env_extra={"STAGEWISE_FAULT": "engine_generate#4"})
    assert out.returncode == -9, out.stderr[-4000:]
    out = resume(args, run_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert outcome(run_dir) == want
    reliability("SIGKILL inside the vLLM engine's generation (3rd rollout step; the engine lives in the run's "
                "process)", "engine_generate#4", "resume=last = uninterrupted run")
