"""The Markdown of docs/RELIABILITY.md, from the rows the fault suite records (see conftest.reliability)."""
from __future__ import annotations

import platform
import time


def render(rows: list[dict], failed: int, collected: int) -> str:
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["fault"].split(":")[0]] = kinds.get(r["fault"].split(":")[0], 0) + 1
    lost = sum(r["lost"] for r in rows)
    lines = [
        "# Reliability: faults injected, bad inputs tried, data lost",
        "",
        "Written by the fault suite, not by hand: `python tools/reliability.py` runs `tests/test_faults.py`",
        "(kills, checkpoints, bad data, non-finite values, disks, two launches), `tests/test_preempt.py` (signals),",
        "`tests/test_exact.py` (the default conf, run.deterministic off, under a CPU load and killed at seeded random",
        "moments), `tests/test_http_teacher.py` (a teacher endpoint that fails), the real model's kills where the",
        "smol extra is installed and, in the vLLM environment, `tests/vllm_engine/test_vllm_faults.py` (the engine",
        "dying mid-rollout), and writes this page from the cases that passed. A case that loses data fails its test:",
        "its row is then missing and the count of failed tests below is not 0.",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} "
        f"({collected} tests collected, {failed} failed).",
        "",
        f"- cases survived: **{len(rows)}** ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})",
        f"- data lost: **{lost}** (steps, ledger rows or checkpoints that a resumed run did not get back)",
        "",
        "| case | fault | result | lost |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['fault']} | {r['result']} | {r['lost']} |" for r in rows]
    if failed:
        lines += ["", f"**{failed} test(s) FAILED in this run**: their cases are missing from the table."]
    return "\n".join(lines) + "\n"
