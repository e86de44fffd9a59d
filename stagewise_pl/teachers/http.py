"""An LLM teacher behind any OpenAI-compatible chat endpoint (OpenAI, vLLM's server, SGLang, llama.cpp, ...).

Standard library only, so that a teacher costs no new dependency. Each prompt is one
``POST {base_url}/chat/completions`` asking for ``n`` choices; at most ``concurrency`` are in flight.

Failures are of three kinds:

- the endpoint is unavailable (HTTP 5xx, 429, a socket timeout, a connection error): retried with
  exponential backoff and jitter;
- the answer is malformed (not JSON, or a choice without a ``message.content`` string): retried too,
  counted in ``stats["malformed"]``;
- the endpoint refuses (any other 4xx, a redirect): not retried, asking again cannot help.

A request that still has no answer after the retries is counted in ``stats["failed"]``; a malformed or refused
one leaves its problem ``[]`` (or ``''``). But when a request of a call is still unavailable after its retries, or
every request was refused, the call raises :class:`~stagewise_pl.teachers.base.TeacherUnavailable` (the answers it
did get are cached first): a server that went away or a bad key must not pass for a teacher with nothing to say.
A run stops on it (exit 7); the answers received before are in the disk cache, so a resume asks for none of them
again.

The API key is read from the environment variable ``api_key_env`` at each request and goes into the
``Authorization`` header only: it is not stored on the object, not part of a cache key, and error
messages never quote a response body (an auth error's body may echo part of the key).
"""
from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

from stagewise_pl.teachers.base import TEACHERS, TeacherError, TeacherUnavailable
from stagewise_pl.teachers.cache import ChatTeacher

MAX_BACKOFF_S = 30.0


class _AttemptFailed(Exception):
    """One attempt got no usable answer; the message is safe to show (no key, no response body)."""


class _Unavailable(_AttemptFailed):
    """5xx, 429, timeout, connection error: the endpoint may answer later (``retry_after``: the seconds the
    endpoint asked for in a Retry-After header, if any)."""

    def __init__(self, reason: str, retry_after: float = 0.0):
        super().__init__(reason)
        self.retry_after = retry_after


class _Malformed(_AttemptFailed):
    """The endpoint answered, but not with chat choices."""


class _Refused(_AttemptFailed):
    """Any other 4xx, or a redirect: asking again cannot help."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would resend the Authorization header to wherever they point."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def retry_after_seconds(headers) -> float:
    """The seconds of a Retry-After header (its number form; an HTTP date or nothing counts as 0)."""
    try:
        return max(0.0, float((headers or {}).get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


def parse_choices(raw: bytes) -> list[str]:
    """The ``message.content`` of every choice of a chat-completions body."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise _Malformed("malformed answer: the body is not JSON") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise _Malformed("malformed answer: no 'choices' list")
    contents = [c.get("message", {}).get("content") if isinstance(c, dict) and isinstance(c.get("message"), dict)
                else None for c in choices]
    if not all(isinstance(text, str) for text in contents):
        raise _Malformed("malformed answer: a choice has no message.content string")
    return contents


@TEACHERS.register("openai")
class OpenAITeacher(ChatTeacher):
    """Traces, critiques, simplifications and repairs from a chat model behind ``base_url``.

    ``timeout_s`` bounds each socket operation (connecting, waiting for the answer to start, each
    read). ``stats["requests"]`` counts HTTP requests sent (retries included: what the endpoint sees),
    ``stats["retries"]`` the repeats among them.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 prompts: Optional[Mapping[str, str]] = None, temperature: float = 0.7, max_tokens: int = 1024,
                 timeout_s: float = 60, max_retries: int = 4, backoff_s: float = 1.0, concurrency: int = 8,
                 cache_dir=None, seed: int = 0):
        if not str(base_url).startswith(("http://", "https://")):
            raise TeacherError(f"openai teacher: base_url must start with http:// or https://, got {base_url!r}")
        if "@" in str(base_url).split("://", 1)[1].split("/", 1)[0]:  # user:password@host would be logged
            raise TeacherError("openai teacher: base_url holds credentials (user@host); put the key in the "
                               "environment variable named by api_key_env instead")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or concurrency < 1:
            raise TeacherError("openai teacher: needs timeout_s > 0, max_retries >= 0, backoff_s >= 0, "
                               f"concurrency >= 1 (got {timeout_s}, {max_retries}, {backoff_s}, {concurrency})")
        super().__init__(model, prompts, temperature, max_tokens, seed, cache_dir)
        self.base_url = str(base_url).rstrip("/")
        self.api_key_env = str(api_key_env)
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.concurrency = int(concurrency)
        self._slots = threading.BoundedSemaphore(self.concurrency)  # the limit holds across concurrent calls too

    def __repr__(self) -> str:
        return f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _identity(self) -> dict:
        return {"base_url": self.base_url}

    def _generate(self, requests: list[dict]) -> list[Optional[list[str]]]:
        """Send the requests concurrently; raise when every one failed for the endpoint's sake."""
        bodies = [{k: v for k, v in r.items() if k != "base_url"} for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
            outcomes = list(pool.map(self._complete, bodies))
        failures = [o for o in outcomes if isinstance(o, _AttemptFailed)]
        unavailable = [f for f in failures if isinstance(f, _Unavailable)]
        whole = len(failures) == len(outcomes) and not any(isinstance(f, _Malformed) for f in failures)
        if unavailable or whole:  # the endpoint, not the teacher: stop rather than train on without its answers
            reasons = Counter(str(f) for f in (unavailable or failures))
            what = f"all {len(failures)}" if len(failures) == len(outcomes) else \
                f"{len(unavailable)} of {len(outcomes)}"
            error = TeacherUnavailable(f"{self!r}: {what} requests failed: "
                                       + "; ".join(f"{reason} (x{k})" for reason, k in reasons.most_common())
                                       + f" (each tried {self.max_retries + 1} times, or refused at once)")
            error.answered = [None if isinstance(o, _AttemptFailed) else o for o in outcomes]  # cached by _ask
            raise error
        return [None if isinstance(o, _AttemptFailed) else o for o in outcomes]

    def _complete(self, body: dict) -> list[str] | _AttemptFailed:
        """One request, retried while retrying can help: its answers, or why it failed."""
        asked = 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(max(self._backoff(attempt - 1), min(asked, MAX_BACKOFF_S)))
            try:
                return self._send(body)
            except _Malformed as exc:
                self._count("malformed")
                failure: _AttemptFailed = exc
            except _Unavailable as exc:
                failure, asked = exc, exc.retry_after
            except _Refused as exc:
                failure = exc
                break
        self._count("failed")
        return failure

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (so that many threads that failed together do not retry together)."""
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _send(self, body: dict) -> list[str]:
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json"})
        key = os.environ.get(self.api_key_env)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        self._count("requests")
        try:
            with self._slots, _OPENER.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            reason = f"HTTP {exc.code} {exc.reason}"
            if 300 <= exc.code < 400:
                reason += " (redirects are not followed: give the final address as base_url)"
            if exc.code >= 500 or exc.code == 429:
                raise _Unavailable(reason, retry_after_seconds(exc.headers)) from None
            raise _Refused(reason) from None
        except urllib.error.URLError as exc:
            raise _Unavailable(f"cannot reach {url}: {exc.reason}") from None
        except TimeoutError:
            raise _Unavailable(f"no answer within timeout_s={self.timeout_s:g}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Unavailable(f"connection to {url} failed: {type(exc).__name__}") from None
        return parse_choices(raw)
