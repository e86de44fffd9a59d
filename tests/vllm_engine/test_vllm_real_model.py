"""SmolLM2-135M-Instruct (``model.name_or_path=smollm2-135m``, the converted checkpoint) served by vLLM on CPU
(marker vllm; .ci/run_vllm installs the smol extra into its environment): generation, the weight push and the
canary on a real 30-layer Llama with a tied head; and the OpenAI-compatible teacher against ``vllm serve`` of the
same checkpoint on loopback, behind an API key, through a run with ``teacher.name=openai``."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import torch

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm", reason="vllm is not installed in this environment (see .ci/run_vllm)")

from stagewise_pl.models.load import load_policy, render_prompts  # noqa: E402
from stagewise_pl.rollout import SamplingParams  # noqa: E402
from stagewise_pl.rollout.vllm_engine import StaleWeightsError, VLLMEngine  # noqa: E402

KEY_ENV = "STAGEWISE_TEST_TEACHER_KEY"
QUESTIONS = ["What is 7 + 5?", "What is 6 times 4?", "Evaluate 9-3+2 from left to right."]


@pytest.fixture(scope="module")
def smol():
    """The converted checkpoint, from the session's cache (.ci/run's slow tier converted it already)."""
    from stagewise_pl.config import default_cache_dir
    from stagewise_pl.models.packaged import packaged_model

    return packaged_model("smollm2-135m", default_cache_dir(), log=None)


@pytest.fixture(scope="module")
def served(smol):
    model, tokenizer = load_policy(str(smol))
    engine = VLLMEngine(str(smol), dtype="float32", max_model_len=512)
    return model, tokenizer, engine, render_prompts(tokenizer, QUESTIONS)


def test_greedy_generation_is_the_training_models_own(served):
    """vLLM's greedy tokens are transformers' greedy tokens on the same prompt ids (chat template, stop token)."""
    model, tokenizer, engine, prompts = served
    batch = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=24))
    assert batch.prompt_ids[0] == tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    for prompt_ids, ids in zip(batch.prompt_ids, batch.completion_ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        theirs = out[0, len(prompt_ids):].tolist()
        assert ids and ids == theirs[:len(ids)], (tokenizer.decode(ids), tokenizer.decode(theirs))
    assert "12" in batch.texts[0]  # a real model: it adds 7 and 5


def test_weight_push_and_canary_on_the_real_model(served):
    """fp32 log-probs agree with transformers' on a real model; an update not pushed, and a push of everything but
    the tied head (the trap of tied embeddings), are caught; a full push passes."""
    model, tokenizer, engine, prompts = served
    assert engine.canary(model, prompts) < 1e-3
    assert model.config.tie_word_embeddings
    saved = {n: t.detach().clone() for n, t in model.state_dict().items()}
    try:
        with torch.no_grad():  # an optimizer step's worth of change in every weight, the tied embedding/head too
            for p in model.parameters():
                p.add_(0.01 * p.std() * torch.randn_like(p))
        with pytest.raises(StaleWeightsError, match="stale or partial"):
            engine.canary(model, prompts)  # not pushed yet
        engine.sync_weights(model, include={n for n in model.state_dict() if n != "lm_head.weight"})
        with pytest.raises(StaleWeightsError):
            engine.canary(model, prompts)  # every weight fresh but the head
        engine.sync_weights(model)
        assert engine.canary(model, prompts) < 1e-3
    finally:  # the module's other tests share the engine and the model
        model.load_state_dict(saved)
        engine.sync_weights(model)


# ------------------------------------------------------------------ vllm serve on loopback, behind a key
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str = "") -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def server(smol, tmp_path_factory):
    """``vllm serve`` of the converted checkpoint (float32, KV cache capped at 1 GiB), answering with the key only
    (given through VLLM_API_KEY, so that it is not on a command line)."""
    key = f"sk-sentinel-{uuid.uuid4().hex}"
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    env = dict(os.environ, VLLM_API_KEY=key, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smol),
               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "8192", "--seed", "0"]
    # the batch holds the teacher's 8 concurrent requests whole: vllm-cpu 0.32 crashes on a seeded request whose
    # prefill is split across steps ("CPU Generator does not use offset"), and the dead server answers 500
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a net for a server that never comes up, not a speed check
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if get(url + "/health") == 200:
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail(f"vllm serve did not come up (rc {process.poll()}):\n" + log.read_text()[-3000:])
    yield process, url + "/v1", key, log
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def test_the_server_answers_with_the_key_only(server):
    _, url, key, _ = server
    assert get(url + "/models") == 401 and get(url + "/models", "sk-wrong") == 401
    assert get(url + "/models", key) == 200


def test_a_run_with_the_served_teacher_keeps_the_key_out_and_pays_nothing_twice(server, fast_overrides, tmp_path):
    """The tiny student learns from SmolLM2 behind vllm serve: Bridge SFT asks it for traces and simplifications,
    CFT for critiques of the student's failures. A second run, with the server stopped, is answered by the disk
    cache alone and ends with the same summaries; the key is in nothing the runs leave."""
    from helpers import fit

    process, url, key, log = server
    cache = tmp_path / "teacher-cache"
    args = fast_overrides + [
        "eval.k=0", "eval.before=false", "eval.each_phase=false", "profile.limit=8", "profile.k=2",
        "bridge.strategy=teacher_simplify", "teacher.name=openai",
        f"teacher.args={{base_url: '{url}', model: smollm2, api_key_env: {KEY_ENV}, cache_dir: '{cache}', "
        "max_tokens: 48, timeout_s: 300, max_retries: 1}",
        "phases=[{name: p, kind: profile}, {name: b, kind: bridge_sft, select: hard, steps: 2}, "
        "{name: c, kind: cft, select: hard, steps: 2}]"]
    out = fit(args + [f"run.dir={tmp_path / 'run'}"], {KEY_ENV: key})
    assert out.returncode == 0, out.stderr[-3000:]
    bridge = json.loads((tmp_path / "run" / "bridge" / "02-b.summary.json").read_text())
    cft = json.loads((tmp_path / "run" / "cft" / "03-c.summary.json").read_text())
    assert bridge["problems"] > 0 and bridge["no_trace"] == 0  # every hard problem got a trace
    assert cft["failures"] > 0 and sum(cft["outcomes"]["diagnosis"].values()) == cft["failures"]
    assert "teacher_failed" not in cft["outcomes"]["diagnosis"]  # every failure got a critique
    assert bridge["teacher_texts"] >= 2 * bridge["problems"] and cft["teacher_texts"] >= cft["failures"]
    process.terminate()  # the repeated run must not need the server
    process.wait(timeout=60)
    again = fit(args + [f"run.dir={tmp_path / 'again'}"], {KEY_ENV: key})
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("bridge/02-b", "cft/03-c"):
        first, second = (json.loads((tmp_path / run / f"{name}.summary.json").read_text()) for run in ("run", "again"))
        assert second == first, name
    assert key not in out.stdout + out.stderr + again.stdout + again.stderr
    for path in [*(tmp_path / "run").rglob("*"), *(tmp_path / "again").rglob("*"), *cache.rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
