"""The shape of the package: no import cycle, every package installed, no module grown past ~400 lines."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_GRAPH = ROOT.parent / "shared" / "tools" / "import_graph.py"


def test_no_import_cycle():
    """The project's import-graph tool (in the shared checkout beside the repository) exits 0."""
    if not IMPORT_GRAPH.is_file():
        pytest.skip(f"{IMPORT_GRAPH} not found (the project's shared/ checkout); .ci/run runs it where it exists")
    out = subprocess.run([sys.executable, str(IMPORT_GRAPH), "stagewise_pl", "callbacks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_every_package_is_installed_and_callbacks_under_the_package():
    """pyproject lists packages by hand (callbacks/ is installed as stagewise_pl.callbacks): the list must name
    every folder with an __init__.py, and the folder that maps to stagewise_pl.callbacks."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stagewise_pl").rglob("__init__.py")}
    assert set(tool["packages"]) == folders | {"stagewise_pl.callbacks"}
    assert tool["package-dir"] == {"stagewise_pl.callbacks": "callbacks"}
    import stagewise_pl.callbacks.rules as rules

    assert Path(rules.__file__).resolve().parent == ROOT / "callbacks"


def test_modules_stay_small():
    """No module over 420 lines but the configuration schema (one dataclass per group, a help text per field)."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in list((ROOT / "stagewise_pl").rglob("*.py")) + list((ROOT / "callbacks").rglob("*.py"))}
    assert {name: n for name, n in sizes.items() if n > 420 and name != "stagewise_pl/config.py"} == {}


def test_lines_stay_within_120_characters():
    """The project's line length, in the package, callbacks, tests and tools alike."""
    long = [f"{p.relative_to(ROOT)}:{i}" for folder in ("stagewise_pl", "callbacks", "tests", "tools")
            for p in sorted((ROOT / folder).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []
