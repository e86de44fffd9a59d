"""A run's report: ``python -m stagewise_pl.report RUN_DIR [--out DIR]``.

Reads what a run directory holds -- ``state.json`` (phases and their summaries), ``eval/*.json``
(held-out accuracy by level), ``curves/*.json`` (per-step losses and rewards), the difficulty ledger
(pass rates per profile phase, buckets, and how problems moved between buckets) -- and writes
``report.md`` with PNG plots beside it and ``report.html``, one self-contained page (plots embedded as
data URIs, no external resource). Needs matplotlib (``pip install -e '.[report]'``).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Optional

from stagewise_pl.buckets import BUCKET_ORDER, DEFAULT_BANDS, PassRateBands, bands_of
from stagewise_pl.plots import Figures, PlotError, bucket_bars, flow_matrix, series


class ReportError(ValueError):
    """The directory is not a run, or the report cannot be made; the message says why."""


# ------------------------------------------------------------------ reading a run
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read ({exc})") from None


def run_bands(run_dir: Path) -> PassRateBands:
    """The pass-rate bands the run routed by (its configuration's rules), else the defaults."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from stagewise_pl.routing import make_rules

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return DEFAULT_BANDS
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    rules = (cfg.get("routing") or cfg.get("stages") or {}).get("rules") or []  # 'stages': runs of format 1
    try:
        return bands_of(make_rules([SimpleNamespace(target=r["target"], args=r.get("args") or {}) for r in rules]))
    except Exception:  # a rule that no longer imports: the report still shows the run, by the default bands
        return DEFAULT_BANDS


def collect(run_dir: Path) -> dict:
    """Everything the report shows, as plain data."""
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").is_file():
        raise ReportError(f"{run_dir}: not a run directory (no state.json)")
    state = _json(run_dir / "state.json")
    phases = OrderedDict(state.get("completed", {}))
    labels = [label for label in ["before", *phases] if (run_dir / "eval" / f"{label}.json").is_file()]
    evals = OrderedDict((label, _json(run_dir / "eval" / f"{label}.json")) for label in labels)
    curves = OrderedDict((f.stem, _json(f)) for f in sorted((run_dir / "curves").glob("*.json")))
    ledger = ledger_stats(run_dir, phases, run_bands(run_dir))
    return {"run": run_dir.name, "dir": str(run_dir), "finished": bool(state.get("finished")), "phases": phases,
            "evals": evals, "curves": curves, **ledger}


def ledger_stats(run_dir: Path, phases: dict, bands: PassRateBands = DEFAULT_BANDS) -> dict:
    """Per phase that graded rollouts: rows, problems, pass rate, zero-reward share, completion length; per
    profile phase: bucket counts; between consecutive profiles: the flow of problems between buckets."""
    from stagewise_pl.ledger import DifficultyLedger

    ledger = DifficultyLedger(run_dir / "ledger", "report", writer=False)
    if not ledger.parts():
        return {"ledger": [], "buckets": OrderedDict(), "flows": []}
    stats = ledger.phase_stats()
    rates = ledger.pass_rates_by_phase([row["phase"] for row in stats if row["kind"] == "profile"])
    buckets = OrderedDict((name, {pid: bands.bucket(r) for pid, r in by.items()}) for name, by in rates.items())
    decisions = [_json(f) for f in sorted((run_dir / "routing").glob("*.json"))]
    for d in decisions:  # a profile's recorded evidence (reused, carried, kept) stands over its own rows
        if d.get("kind") == "profile" and d.get("evidence") is not None and d.get("phase") in phases:
            buckets[d["phase"]] = {pid: bands.bucket(e["c"] / e["n"]) for pid, e in d["evidence"].items() if e["n"]}
    order = [n for n in phases if n in buckets] + [n for n in buckets if n not in phases]
    buckets = OrderedDict((n, buckets[n]) for n in order)
    names = list(buckets)
    flows = []
    for a, b in zip(names, names[1:]):
        common = [pid for pid in buckets[a] if pid in buckets[b]]
        moved = Counter((buckets[a][pid], buckets[b][pid]) for pid in common)
        matrix = {x: {y: moved[(x, y)] for y in BUCKET_ORDER} for x in BUCKET_ORDER}
        flows.append({"from": a, "to": b, "problems": len(common), "matrix": matrix})
    counts = OrderedDict((name, {k: sum(1 for v in m.values() if v == k) for k in BUCKET_ORDER})
                         for name, m in buckets.items())
    return {"ledger": stats, "buckets": counts, "flows": flows}


# ------------------------------------------------------------------ plots
def plots(data: dict, out: Path) -> list[tuple[str, str]]:
    """(title, file name) of every PNG written to ``out``."""
    try:
        figs = Figures(out)
    except PlotError as exc:
        raise ReportError(str(exc)) from None
    for benchmark in _benchmarks(data):
        labels = [lab for lab, ev in data["evals"].items() if benchmark in ev]
        levels = list(data["evals"][labels[0]][benchmark]["by_level"])
        fig, axes = figs.figure(7, 3.6)
        ax = axes[0][0]
        for level in levels:
            ys = [data["evals"][lab][benchmark]["by_level"].get(level, {}).get("pass@1") for lab in labels]
            ax.plot(labels, ys, marker="o", label="all levels" if level == "all" else f"level {level}",
                    linewidth=2.5 if level == "all" else 1.2, color="black" if level == "all" else None)
        ax.set(ylim=(-0.02, 1.02), ylabel="pass@1", xlabel="after phase", title=f"held-out {benchmark}")
        ax.legend(fontsize=7, ncol=2)
        figs.save(fig, f"accuracy-{_slug(benchmark)}.png", f"Held-out pass@1 on {benchmark} after each phase")
    if data["buckets"]:
        names = list(data["buckets"])
        fig, axes = figs.figure(6, 3.4)
        ax = axes[0][0]
        bucket_bars(ax, names, {b: [data["buckets"][n][b] for n in names] for b in BUCKET_ORDER})
        ax.set(ylabel="problems", title="buckets at each profile")
        ax.legend(fontsize=8)
        figs.save(fig, "buckets.png", "Problems per bucket at each profile phase")
    for flow in data["flows"]:
        fig, axes = figs.figure(4, 3.4)
        flow_matrix(axes[0][0], flow["matrix"], f"at {flow['to']}", f"at {flow['from']}", "flow between buckets")
        figs.save(fig, f"flow-{_slug(flow['from'])}-{_slug(flow['to'])}.png",
                  f"How problems moved between buckets from {flow['from']} to {flow['to']}")
    for name, curves in data["curves"].items():
        keys = [k for k in ("loss", "reward", "pass_rate", "rollout_kl")
                if k in curves and any(v is not None for v in curves[k])]
        if not keys:
            continue
        fig, axes = figs.figure(3.6 * len(keys), 3, 1, len(keys))
        for ax, key in zip(axes[0], keys):
            series(ax, curves[key], "step", key, f"{name}: {key}")
        figs.save(fig, f"curve-{_slug(name)}.png", f"Per-step {', '.join(keys)} of phase {name}")
    return figs.made


def _benchmarks(data: dict) -> list[str]:
    seen: list[str] = []
    for ev in data["evals"].values():
        seen += [b for b in ev if b not in seen]
    return seen


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ------------------------------------------------------------------ tables
def tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table."""
    out = []
    rows = []
    for name, s in data["phases"].items():
        detail = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("kind", "select", "buckets")
                           and not k.startswith("seconds")
                           and not isinstance(v, (dict, list)))
        rows.append([name, str(s.get("kind", "")), str(s.get("select", "")), detail, str(s.get("seconds", ""))])
    out.append(("Phases", ["phase", "kind", "data", "summary", "seconds"], rows))
    for benchmark in _benchmarks(data):
        labels = [lab for lab, ev in data["evals"].items() if benchmark in ev]
        levels = list(data["evals"][labels[0]][benchmark]["by_level"])
        rows = [[f"level {lv}" if lv != "all" else "all", *[_fmt(data["evals"][lab][benchmark]["by_level"].get(lv, {})
                                                                   .get("pass@1")) for lab in labels]] for lv in levels]
        out.append((f"Held-out pass@1: {benchmark}", ["level", *labels], rows))
    if data["ledger"]:
        out.append(("Ledger: graded rollouts per phase", ["phase", "kind", "rollouts", "problems", "pass rate",
                                                          "never solved", "tokens per completion", "truncated"],
                    [[s["phase"], s["kind"], str(s["rollouts"]), str(s["problems"]), _fmt(s["pass_rate"]),
                      _fmt(s["never_solved"]), f"{s['completion_tokens']:.1f}", _fmt(s["truncated"])]
                     for s in data["ledger"]]))
    if data["buckets"]:
        out.append(("Buckets at each profile", ["profile", *BUCKET_ORDER],
                    [[n, *[str(c[b]) for b in BUCKET_ORDER]] for n, c in data["buckets"].items()]))
    return out


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------ output
def markdown(data: dict, images: list[tuple[str, str]]) -> str:
    lines = [f"# Run {data['run']}", "", f"Directory `{data['dir']}`; "
             + ("finished." if data["finished"] else "**not finished** (a report of the phases done so far)."), ""]
    for title, header, rows in tables(data):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows] + [""]
    for title, name in images:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


PAGE_CHECK = """<script>
// the page reports its own rendering: every plot decoded, every table filled, no script error
window.addEventListener("error", function () {
  document.body.dataset.errors = String(Number(document.body.dataset.errors || 0) + 1); });
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var rows = document.querySelectorAll("table tbody tr").length;
  document.body.dataset.rendered = ok + "/" + imgs.length + " plots, " + rows + " table rows";
});
</script>"""


def page(data: dict, images: list[tuple[str, str]], out: Path) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Run {esc(data['run'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0 "
             "1.5em}</style>", PAGE_CHECK, "</head><body>",
             f"<h1>Run {esc(data['run'])}</h1><p>Directory <code>{esc(data['dir'])}</code>; "
             + ("finished." if data["finished"] else "<b>not finished</b>.") + "</p>"]
    for title, header, rows in tables(data):
        parts.append(f"<h2>{esc(title)}</h2><table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                     + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                                                        for row in rows) + "</tbody></table>")
    for title, name in images:
        encoded = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{encoded}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Write report.md, its PNGs and report.html into ``out`` (default ``<run>/report``); returns ``out``."""
    data = collect(Path(run_dir))
    out = Path(out) if out else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plots(data, out)
    (out / "report.md").write_text(markdown(data, images))
    (out / "report.html").write_text(page(data, images, out))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise_pl.report", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", help="a run directory (the run.dir of python -m stagewise_pl.fit)")
    parser.add_argument("--out", help="where to write the report (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        out = write(Path(args.run_dir), Path(args.out) if args.out else None)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
