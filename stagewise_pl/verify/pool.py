"""A pool of grading processes with a hard wall-clock bound per call.

Parsing and comparing model output can hang (a power tower, ``100000!``, pathological LaTeX) and
math-verify's own timeout relies on SIGALRM, which only works on a process's main thread. So every
verdict is computed in a worker process: the caller waits on a pipe for at most ``timeout_s``; a
worker that does not answer in time is killed and replaced, and the completion is graded again on the
replacement (``retries`` times, 1 by default), so a stall of a loaded machine does not become a verdict and
the same run grades the same way on a busy machine as on an idle one. Only a completion that times out on
every try is ``Verdict(0, "timeout")``: a true hang costs ``(1 + retries) * timeout_s``. A worker that
dies (out of memory under its address-space limit, a crash) yields ``Verdict(0, "error")`` and is
replaced too. Exceptions never cross to the caller.

Thread-safe: each call checks out an idle worker, so callers on many threads grade in parallel;
``score_batch`` does exactly that over a small thread pool. A started interpreter takes about a
second to import a math stack, so the pool keeps one spare worker warm: a killed worker is
replaced at once by the spare, and a new spare starts in the background.

Any registered verifier (or one named by dotted path) runs in the pool unchanged: the worker builds
it from its name and keyword arguments.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Optional, Sequence

from stagewise_pl.faults import fault_point
from stagewise_pl.verify.base import Verdict, get_verifier

_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])

def worker_main(fd: int, name: str, kwargs: dict, memory_mb: int) -> None:
    """Worker loop: build the verifier once, then answer each list of (completion, gold) pairs with one
    (reward, reason) message per pair."""
    conn = Connection(fd)
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        verifier = get_verifier(name, **kwargs)
        verifier.score("", "1")  # import and warm whatever the verifier loads lazily
    except BaseException as exc:  # report a broken verifier instead of dying silently
        conn.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        # a list of (completion, gold) pairs: a stream of verdicts, one message each, as soon as each is ready
        for completion, gold in item:
            try:
                verdict = verifier.score(completion, gold)
                conn.send((float(verdict.reward), verdict.reason))
            except BaseException:  # noqa: BLE001  (anything a verifier raises, MemoryError too, is 'error')
                conn.send((0.0, "error"))


class _Worker:
    """One grading process, started with ``python -m stagewise_pl.verify.worker`` over a socket pair.

    A fresh interpreter (not fork, not multiprocessing's spawn) so that neither the parent's threads
    nor its ``__main__`` module matter: it works the same under Lightning, pytest, a notebook or stdin.
    """

    def __init__(self, name: str, kwargs: dict, memory_mb: int):
        parent, child = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [_SOURCE_ROOT, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stagewise_pl.verify.worker", str(child.fileno()), name, json.dumps(kwargs),
             str(memory_mb)], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=env)
        child.close()
        self.conn = Connection(parent.detach())
        self.ready = False

    def wait_ready(self, timeout: float) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout):
            raise RuntimeError(f"a grading worker did not start within {timeout:.0f} s")
        try:
            status, detail = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"a grading worker exited while starting (code {self.process.wait()})") from None
        if status != "ready":
            raise RuntimeError(f"the verifier cannot be built in a worker: {detail}")
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.wait(timeout=2)
            self.conn.close()
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()


_POOLS: "weakref.WeakSet[GradingPool]" = weakref.WeakSet()


class GradingPool:
    """``score(completion, gold) -> Verdict`` with a hard bound, in ``workers`` processes."""

    start_timeout_s = 60.0

    def __init__(self, name: str, kwargs: Optional[dict] = None, workers: int = 1, timeout_s: float = 5.0,
                 memory_mb: int = 2048, retries: int = 1):
        if workers < 1:
            raise ValueError("a grading pool needs at least one worker")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.name, self.kwargs = name, dict(kwargs or {})
        self.workers, self.timeout_s, self.memory_mb, self.retries = workers, timeout_s, memory_mb, retries
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        # timeouts: 'timeout' verdicts; retried: tries that timed out and were graded again
        self.timeouts = self.retried = self.errors = self.restarts = self.nonfinite = 0
        spawned = [self._spawn() for _ in range(workers + 1)]
        try:
            for worker in spawned:  # a verifier that cannot be built fails here, before any grading
                worker.wait_ready(self.start_timeout_s)
        except RuntimeError:
            for worker in spawned:
                worker.kill()
            raise
        self._spare: Optional[_Worker] = spawned.pop()
        for worker in spawned:
            self._idle.put(worker)
        _POOLS.add(self)

    def _spawn(self) -> _Worker:
        return _Worker(self.name, self.kwargs, self.memory_mb)

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill a stuck or dead worker; its place goes to the warm spare, and a new spare starts."""
        worker.kill()
        with self._lock:
            self.restarts += 1
            replacement, self._spare = self._spare, self._spawn()
        return replacement if replacement is not None else self._spawn()

    def score(self, completion: str, gold: str) -> Verdict:
        return self.score_many([(completion, gold)])[0]

    def score_many(self, pairs: Sequence[tuple[str, str]], progress=None) -> list[Verdict]:
        """Grade ``pairs`` on one worker: sent as one message, answered as a stream, each answer
        waited for at most ``timeout_s`` (the bound per try holds). A worker that times out or dies is
        replaced and the rest of the pairs go to its replacement; a pair that timed out goes with them
        until it has timed out ``1 + retries`` times."""
        if self._closed:
            raise RuntimeError("this grading pool is closed")
        out: list[Verdict] = []
        tries = 0  # timed-out tries of the pair at len(out)
        worker = self._idle.get()
        try:
            while len(out) < len(pairs):
                todo = pairs[len(out):]
                worker.wait_ready(self.start_timeout_s)
                try:
                    worker.conn.send(list(todo))
                    fault_point("verify")
                    for _ in todo:
                        if not worker.conn.poll(self.timeout_s):
                            tries += 1
                            final = tries > self.retries
                            with self._lock:
                                self.timeouts, self.retried = self.timeouts + final, self.retried + (not final)
                            if final:
                                out.append(Verdict(0.0, "timeout"))
                                tries = 0
                            worker = self._replace(worker)
                            break
                        tries = 0
                        reward, reason = worker.conn.recv()
                        if not math.isfinite(reward):  # a verifier's NaN/inf reward: 0, and counted
                            with self._lock:
                                self.nonfinite += 1
                            reward = 0.0
                        out.append(Verdict(reward, reason))
                        if progress is not None:
                            progress.update(1)
                except (EOFError, OSError, BrokenPipeError):  # the worker died (memory limit, crash)
                    with self._lock:
                        self.errors += 1
                    out.append(Verdict(0.0, "error"))
                    worker = self._replace(worker)
            return out
        finally:
            self._idle.put(worker)

    def score_batch(self, completions: Sequence[str], golds: Sequence[str], progress: bool = False,
                    desc: str = "grading") -> list[Verdict]:
        """Grade many pairs in parallel over the workers (one contiguous share each, streamed: see
        :meth:`score_many`); the order of the result is the input's."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions for {len(golds)} golds")
        if not completions:
            return []
        from stagewise_pl.progress import progress as progress_of

        pairs = list(zip(completions, golds))
        chunk = -(-len(pairs) // (4 * self.workers))  # a few shares per worker: slow items do not idle the others
        shares = [pairs[i:i + chunk] for i in range(0, len(pairs), chunk)]
        with progress_of(len(pairs), desc, enabled=progress) as bar:
            if self.workers == 1:
                return self.score_many(pairs, bar)
            with ThreadPoolExecutor(max_workers=self.workers) as threads:
                return [v for part in threads.map(lambda share: self.score_many(share, bar), shares) for v in part]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                break

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@atexit.register
def _close_pools() -> None:
    if os.getpid() == _MAIN_PID:
        for pool in list(_POOLS):
            pool.close()


_MAIN_PID = os.getpid()
