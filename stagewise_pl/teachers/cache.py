"""What the LLM teachers (``openai``, ``vllm``) share: prompt templates, the disk cache of answers, and
the four teacher calls built on "send these chat prompts, get ``n`` answers each".

Answers are cached because a large model's traces are expensive and a run (or ``tools/make_traces.py``)
that is restarted must not pay for them twice. A cache entry is keyed by the sha256 of the canonical
JSON of everything that decides the answer (endpoint, model, messages, sampling settings, seed) and
never by a credential; one file per request, written atomically, so a crash leaves either a whole
entry or none.
"""
from __future__ import annotations

import hashlib
import json
import string
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

from stagewise_pl.data.problems import Problem
from stagewise_pl.io import atomic_write
from stagewise_pl.teachers.base import TeacherError

# Each template's placeholders: all must be used (a template that ignores the problem is a mistake).
PROMPT_FIELDS = {
    "teacher_trace": ("problem",),
    "teacher_critique": ("problem", "solution"),
    "teacher_simplify": ("problem", "trace"),
    "teacher_repair": ("problem", "solution", "critique"),
}



def default_prompts() -> dict[str, str]:
    """The teacher templates of conf/prompts/default.yaml: prompt templates live in conf/, not in code."""
    from stagewise_pl.config import load_prompts

    return {k: v for k, v in load_prompts("default").items() if k in PROMPT_FIELDS}


STAT_KEYS = ("requests", "cache_hits", "retries", "malformed", "failed")


def check_prompts(prompts: Optional[Mapping[str, str]]) -> dict[str, str]:
    """The templates to use: :func:`default_prompts` overlaid with ``prompts``, each checked now so that a
    bad template fails before any request is paid for.

    Keys not starting with ``teacher_`` are ignored (a prompt file also holds the student's templates);
    an unknown ``teacher_`` key is an error (a typo would otherwise silently keep the default).
    """
    given = {k: v for k, v in dict(prompts or {}).items() if str(k).startswith("teacher_")}
    unknown = sorted(set(given) - set(PROMPT_FIELDS))
    if unknown:
        raise TeacherError(f"prompts: unknown template {', '.join(unknown)}; known: {', '.join(PROMPT_FIELDS)}")
    merged = {**default_prompts(), **given}
    for key, template in merged.items():
        if not isinstance(template, str):
            raise TeacherError(f"prompts: {key} must be a string, got {type(template).__name__}")
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise TeacherError(f"prompts: {key}: {exc} (write a literal brace as {{{{ or }}}})") from None
        allowed = set(PROMPT_FIELDS[key])
        if used - allowed:
            raise TeacherError(f"prompts: {key} uses {_braced(used - allowed)}; allowed: {_braced(allowed)} "
                               f"(write a literal brace as {{{{ or }}}})")
        if allowed - used:
            raise TeacherError(f"prompts: {key} does not use {_braced(allowed - used)}")
    return merged


def _braced(names) -> str:
    return ", ".join("{" + name + "}" for name in sorted(names))


class AnswerCache:
    """One JSON file per answered request in ``directory``, named by the request's hash."""

    def __init__(self, directory):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(request: Mapping) -> str:
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> Optional[list[str]]:
        """The cached answers, or None when there are none (an unreadable entry counts as none)."""
        try:
            answers = json.loads(self._path(key).read_text(encoding="utf-8"))["answers"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return answers if isinstance(answers, list) and all(isinstance(a, str) for a in answers) else None

    def put(self, key: str, request: Mapping, answers: Sequence[str]) -> None:
        """Store atomically (temp file, then rename): a reader never sees half an entry. The request is
        kept beside the answers so an entry can be inspected by hand."""
        atomic_write(self._path(key), json.dumps({"request": request, "answers": list(answers)}, ensure_ascii=False))


class ChatTeacher:
    """The four teacher calls as chat prompts answered by a model, through the disk cache.

    A subclass says where requests go (:meth:`_identity`, part of every cache key) and answers the
    requests the cache does not hold (:meth:`_generate`: one entry per request, a list of answers or
    None when it failed). ``stats`` counts requests, cache hits, retries, malformed answers and failures.
    """

    def __init__(self, model: str, prompts: Optional[Mapping[str, str]], temperature: float, max_tokens: int,
                 seed: int, cache_dir):
        self.model = str(model)
        self.prompts = check_prompts(prompts)
        self.temperature, self.max_tokens, self.seed = float(temperature), int(max_tokens), int(seed)
        self.cache = AnswerCache(cache_dir) if cache_dir else None
        self.stats = {key: 0 for key in STAT_KEYS}
        self._stats_lock = threading.Lock()

    def _count(self, key: str, k: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += k

    def _identity(self) -> dict:
        raise NotImplementedError

    def _generate(self, requests: list[dict]) -> list[Optional[list[str]]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the teacher calls
    def traces(self, problems: Sequence[Problem], n: int = 1) -> list[list[str]]:
        """Up to ``n`` traces per problem, in input order; a problem whose request failed gets []."""
        contents = [self._render("teacher_trace", problem=p.prompt) for p in problems]
        return [answers or [] for answers in self._ask(contents, n)]

    def critique(self, problem: Problem, failed_completion: str) -> str:
        return self._ask_one("teacher_critique", problem=problem.prompt, solution=failed_completion)

    def simplify(self, problem: Problem, trace: str) -> str:
        return self._ask_one("teacher_simplify", problem=problem.prompt, trace=trace)

    def repair(self, problem: Problem, failed_completion: str, critique: str = "") -> str:
        return self._ask_one("teacher_repair", problem=problem.prompt, solution=failed_completion, critique=critique)

    # batched forms: one call, every request under the concurrency limit ('' where one failed)
    def critique_many(self, items: Sequence[tuple]) -> list[str]:
        return self._ask_each("teacher_critique", [dict(problem=p.prompt, solution=f) for p, f in items])

    def simplify_many(self, items: Sequence[tuple]) -> list[str]:
        return self._ask_each("teacher_simplify", [dict(problem=p.prompt, trace=t) for p, t in items])

    def repair_many(self, items: Sequence[tuple]) -> list[str]:
        return self._ask_each("teacher_repair", [dict(problem=p.prompt, solution=f, critique=c) for p, f, c in items])

    # ------------------------------------------------------------------ plumbing
    def _ask_each(self, key: str, fields: list[dict]) -> list[str]:
        if not fields:
            return []
        return [answers[0] if answers else "" for answers in self._ask([self._render(key, **f) for f in fields], 1)]

    def _render(self, key: str, **fields: str) -> str:
        return self.prompts[key].format(**fields)

    def _ask_one(self, key: str, **fields: str) -> str:
        """One answer; '' when the request failed (counted in ``stats``)."""
        (answers,) = self._ask([self._render(key, **fields)], 1)
        return answers[0] if answers else ""

    def _request(self, content: str, n: int) -> dict:
        return {**self._identity(), "model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature, "max_tokens": self.max_tokens, "n": int(n), "seed": self.seed}

    def _ask(self, contents: list[str], n: int) -> list[Optional[list[str]]]:
        """Answers per content: from the cache where it has them, the rest generated (and the successful
        ones cached). The cache is read for every request before anything is generated."""
        requests = [self._request(c, n) for c in contents]
        keys = [AnswerCache.key(r) for r in requests]
        answers = [self.cache.get(k) if self.cache else None for k in keys]
        self._count("cache_hits", sum(a is not None for a in answers))
        todo = [i for i, a in enumerate(answers) if a is None]
        try:
            generated = self._generate([requests[i] for i in todo]) if todo else []
        except TeacherError as exc:  # an endpoint that went away mid-call: keep what it did answer, then stop
            for i, fresh in zip(todo, getattr(exc, "answered", [])):
                if fresh is not None and self.cache:
                    self.cache.put(keys[i], requests[i], fresh)
            raise
        for i, fresh in zip(todo, generated):
            if fresh is not None and self.cache:
                self.cache.put(keys[i], requests[i], fresh)
            answers[i] = fresh
        return answers
