"""The documentation: docs/CONFIG.md is what tools/config_doc.py makes of the configuration schema, and every
relative link of README.md and docs/**/*.md points to a file or folder that exists."""
import difflib
import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target), with an optional "title"; reference definitions: [name]: target
INLINE = re.compile(r"(!?)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\"|\s+'[^']*')?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s|$)", re.M)
# copies of a run's output (stagewise_pl.report, the experiment's results): their HTML twin embeds the plots, and
# not every PNG they name was copied beside them
RUN_OUTPUT = {"report.md", "results.md", "summary.md", "breakdown.md"}


def config_doc():
    path = ROOT / "tools" / "config_doc.py"
    spec = importlib.util.spec_from_file_location("config_doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_doc_is_current():
    """docs/CONFIG.md equals what the generator makes of the schema today (the keys --help prints)."""
    expected = config_doc().render()
    path = ROOT / "docs" / "CONFIG.md"
    actual = path.read_text() if path.is_file() else ""
    if actual != expected:
        diff = list(difflib.unified_diff(actual.splitlines(), expected.splitlines(), "docs/CONFIG.md", "the schema",
                                         lineterm="", n=1))
        pytest.fail("docs/CONFIG.md is out of date with the configuration schema: run "
                    "`python tools/config_doc.py --write`\n" + "\n".join(diff[:40]), pytrace=False)


def test_config_doc_names_every_key_help_prints():
    from stagewise_pl.config import describe

    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    keys = [m[1] for line in describe() if (m := re.match(r"^\s*(\S+) = ", line.lstrip("\n")))]
    assert keys and [key for key in keys if f"`{key}`" not in doc] == []


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def links(text: str) -> list[tuple[bool, str]]:
    """(is an image, target) of every link outside code."""
    text = re.sub(r"^( {0,3})(```|~~~).*?^\1\2[^\n]*$", "", text, flags=re.M | re.S)  # fenced blocks
    text = re.sub(r"(`+).*?\1", "", text, flags=re.S)  # code spans
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("    ", "\t")))  # indented code
    return [(m[1] == "!", m[2]) for m in INLINE.finditer(text)] + [(False, t) for t in REFERENCE.findall(text)]


def test_links_helper_finds_links_and_skips_code():
    text = ("See [a](docs/A.md#x), ![p](p.png 'title') and `[not](code.md)`.\n\n    [indented](code.md)\n\n"
            "```\n[fenced](code.md)\n```\n[ref]: other.md\n")
    assert links(text) == [(False, "docs/A.md#x"), (True, "p.png"), (False, "other.md")]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(path):
    broken = []
    run_output = path.name in RUN_OUTPUT and (ROOT / "docs" / "results") in path.parents
    for image, target in links(path.read_text()):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http(s), mailto, ...
        relative = unquote(target.split("#", 1)[0])
        if not relative:
            continue  # an anchor in the same page
        resolved = ROOT / relative.lstrip("/") if relative.startswith("/") else path.parent / relative
        if resolved.exists() or (run_output and image):
            continue
        broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)} links to paths that do not exist: {broken}"
