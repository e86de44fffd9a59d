"""Third-party verifiers for the tests, loaded by dotted path (never registered in the core)."""
import os

from stagewise_pl.verify.base import Verdict


class LengthVerifier:
    """Correct when the completion has exactly ``gold`` characters."""

    def __init__(self, after_think: bool = False, scale: int = 1):
        self.scale = scale

    def score(self, completion: str, gold: str) -> Verdict:
        return Verdict(1.0, "correct") if len(completion) * self.scale == int(gold) else Verdict(0.0, "wrong")


class MisbehavingVerifier:
    """Crashes the process, eats memory or sleeps on command; grades everything else correct."""

    def __init__(self, after_think: bool = False):
        pass

    def score(self, completion: str, gold: str) -> Verdict:
        if completion == "crash":
            os._exit(3)
        if completion == "hog":
            import numpy as np

            # 16 GiB in 256 MiB blocks, over any worker limit; np.empty maps the pages without touching them, so the
            # limit is reached in milliseconds however loaded the machine is (zero-filled blocks took seconds)
            blocks = [np.empty(256 * 1024 * 1024, dtype=np.uint8) for _ in range(64)]
            return Verdict(float(len(blocks)), "correct")
        if completion == "sleep":
            import time

            time.sleep(60)
        if completion == "raise":
            raise ValueError("a verifier bug")
        return Verdict(1.0, "correct")


class NaNVerifier:
    """Rewards ``float(completion)`` for "nan" and "inf" (a buggy verifier), else 1.0 when it equals the gold."""

    def __init__(self, after_think: bool = False):
        pass

    def score(self, completion: str, gold: str) -> Verdict:
        if completion in ("nan", "inf"):
            return Verdict(float(completion), "correct")
        return Verdict(1.0, "correct") if completion == gold else Verdict(0.0, "wrong")


class StallOnceVerifier:
    """Stalls (sleeps 60 s) the first time it grades "stall", as a busy machine's stall would, and grades it
    correct on any later try; the first try is marked by creating ``marker`` (shared by fresh processes)."""

    def __init__(self, after_think: bool = False, marker: str = ""):
        self.marker = marker

    def score(self, completion: str, gold: str) -> Verdict:
        if completion == "stall":
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return Verdict(1.0, "correct")
            import time

            time.sleep(60)
        return Verdict(1.0, "correct")
