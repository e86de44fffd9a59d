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
        "Written by the fault suite, not by hand: `python tools/reliability.py` runs `tests/test_faults.py`,",
        "`tests/test_preempt.py` and the bad-data tests and writes this page from the cases that passed.",
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
