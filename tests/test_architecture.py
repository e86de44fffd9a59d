"""The shape of the package: no import cycle, the leaves never import the phase kinds, every package installed, no
module grown past ~400 lines."""
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_GRAPH = ROOT / "tools" / "import_graph.py"


def import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", IMPORT_GRAPH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_and_no_leaf_imports_a_phase_kind():
    """tools/import_graph.py (every import, lazy ones too) exits 0: no cycle, and models/, data/, rollout/, verify/,
    kernels/ and tasks/ import nothing of phases/."""
    out = subprocess.run([sys.executable, str(IMPORT_GRAPH)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    edges = import_graph().graph()
    assert "stagewise_pl.phases.warmup" in edges["stagewise_pl.run"]  # lazy imports are read too
    assert "stagewise_pl.rules" not in edges and "stagewise_pl.callbacks.rules" in edges  # callbacks/, installed


def test_the_import_graph_finds_a_cycle_and_a_forbidden_import():
    tool = import_graph()
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert tool.cycles(edges) == [["a", "b", "c"]] and tool.cycles({"a": {"b"}, "b": set()}) == []
    assert tool.forbidden({"stagewise_pl.models.base": {"stagewise_pl.phases.driver", "stagewise_pl.io"}}) == [
        "stagewise_pl.models.base -> stagewise_pl.phases.driver"]


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
    """No module over 420 lines but the configuration schema (schema.py: one dataclass per group, a help text per
    field)."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in list((ROOT / "stagewise_pl").rglob("*.py")) + list((ROOT / "callbacks").rglob("*.py"))}
    assert {name: n for name, n in sizes.items() if n > 420 and name != "stagewise_pl/schema.py"} == {}


def test_lines_stay_within_120_characters():
    """The project's line length, in the package, callbacks, tests and tools alike."""
    long = [f"{p.relative_to(ROOT)}:{i}" for folder in ("stagewise_pl", "callbacks", "tests", "tools")
            for p in sorted((ROOT / folder).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []
