"""Verifiers: grade a completion against a gold answer.

``get_verifier(name)`` builds a verifier in this process (registered name or dotted path);
``make_verifier(cfg)`` runs it in a :class:`GradingPool` with a hard time bound per call.
"""
from stagewise_pl.verify.base import VERIFIERS, Verdict, get_verifier
from stagewise_pl.verify import exact, math  # noqa: F401  (register "exact" and "math")



def make_verifier(cfg):
    """The configured verifier (``cfg.verifier``) in a grading pool with its time and memory bounds."""
    from stagewise_pl.verify.pool import GradingPool

    kwargs = {"after_think": cfg.after_think, **dict(cfg.options)}
    return GradingPool(cfg.name, kwargs, workers=cfg.workers, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb,
                       retries=cfg.timeout_retries)


__all__ = ["VERIFIERS", "Verdict", "get_verifier", "make_verifier"]
