"""python -m stagewise_pl.report RUN_DIR: tables and plots of a run's phases, buckets, ledger and metrics as
Markdown with PNGs and one self-contained HTML page; headless Chromium renders the page (marker browser)."""
import re
import shutil
import subprocess
import sys

import pytest

from helpers import fit

PLAN = ("phases=[{name: s, kind: sft, steps: 3, lr: 5e-4}, {name: p, kind: profile, limit: 24}, "
        "{name: g, kind: grpo, select: medium, steps: 2, lr: 1e-4}, {name: p2, kind: profile, limit: 24}]")


@pytest.fixture(scope="module")
def report(tmp_path_factory, base_overrides):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    out = fit(base_overrides + [PLAN, f"run.dir={run_dir}", "profile.k=4", "grpo.prompts_per_step=4",
                                "grpo.num_generations=4", "grpo.max_new_tokens=24", "trainer.batch_size=16",
                                "eval.before=true"])
    assert out.returncode == 0, out.stderr[-3000:]
    made = subprocess.run([sys.executable, "-m", "stagewise_pl.report", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return run_dir / "report"


@pytest.mark.slow  # its run takes ~27 s (the fast tier stays within 8 minutes)
def test_the_report_has_every_table_and_plot(report):
    md = (report / "report.md").read_text()
    for title in ("## Phases", "## Held-out pass@1: synthetic-test", "## Ledger: graded rollouts per phase",
                  "## Buckets at each profile"):
        assert title in md
    assert re.search(r"\| all \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", md)  # before, after s, after g
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["accuracy-synthetic-test.png", "buckets.png", "curve-01-s.png", "curve-03-g.png",
                    "flow-p-p2.png"]
    for name in pngs:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md
    page = (report / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(pngs)
    assert "http://" not in page and "https://" not in page  # self-contained


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stagewise_pl.report", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a run directory" in out.stderr
    assert subprocess.run([sys.executable, "-m", "stagewise_pl.report", "--help"], capture_output=True).returncode == 0


@pytest.mark.browser
def test_headless_chromium_renders_the_page_without_console_errors(report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("no chromium here: .ci/run_browser installs Debian's chromium package")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", (report / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    body = re.search(r"<body[^>]*>", out.stdout).group(0)
    plots = len(list(report.glob("*.png")))
    rendered = re.search(r'data-rendered="(\d+)/(\d+) plots, (\d+) table rows"', body)
    assert rendered, body  # the page's own check ran
    assert int(rendered.group(1)) == int(rendered.group(2)) == plots and int(rendered.group(3)) > 10
    assert "data-errors" not in body
    assert ":CONSOLE" not in out.stderr, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
