"""What a reader sees describes the library, its measurements and how to reproduce them, never how or where it
was built: no "this project's machines", no tracker numbers, no "lent" hardware or work sessions.

Scanned: every Markdown and Python file under ``docs/`` (pages added later included), ``README.md``, every file
under ``src/`` (docstrings, messages, comments), ``examples/`` and ``benchmarks/``, and the text of the tests
(skip reasons, docstrings) other than this file. Also checked: every install line that names the package on an
index (``pip install "fourierft[extra]"``) gives the form that works from a clone (``pip install -e ".[extra]"``)
beside it, since the name is not on every index.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: phrase -> what it betrays. Case-insensitive, on word boundaries.
PATTERNS = {
    r"\b(?:this|the) project(?:'s)?\b": "where it was built (\"on this project's machines\")",
    r"\bbuild machines?\b": "the machine it was built on",
    r"\blent\b": "borrowed hardware",
    r"\bno GPU was\b": "what hardware the authors had",
    r"\bissues?\s*#?\d+": "a tracker number (\"issue 22\")",
    r"\bthe issue'?s\b": "the tracker's issue",
    r"\btracker\b": "an issue tracker",
    r"(?<![.\"'])\bsessions?\b": "a work session",  # not pytest's scope="session" nor requests.Session
    r"\bsuperseded\b": "the page's own history",
    r"\bearlier run of this page\b": "the page's own history",
}
_COMPILED = [(re.compile(p, re.I), why) for p, why in PATTERNS.items()]

SUFFIXES = {".md", ".py", ".txt", ".toml", ".cfg", ".json", ".yml", ".yaml"}


def _files() -> list[pathlib.Path]:
    files = [ROOT / "README.md"]
    for folder in ("docs", "src", "examples", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or path.suffix not in SUFFIXES or "__pycache__" in path.parts or any(
                    part.endswith(".egg-info") for part in path.parts):
                continue
            if path.name == pathlib.Path(__file__).name or path.parent.name == "results":
                continue  # this file names the phrases; benchmark results are data
            files.append(path)
    return files


def _hits(text: str) -> list[tuple[int, str, str]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in _COMPILED:
            match = pattern.search(line)
            if match:
                out.append((number, match.group(0), why))
    return out


def test_the_patterns_catch_the_phrases_they_are_for():
    for phrase in ("pip install torch  # on this project's machines: the CPU wheel", "no GPU was lent while",
                   "Targets (issue 22)", "see issue #7", "The earlier run of this page is superseded",
                   "fitted on the 2-core build machine", "within the issue's budgets", "in this session",
                   "measured over two sessions", "on the project's 2-core CPU"):
        assert _hits(phrase), phrase
    for phrase in ("a silent change", "the talented lentils", "PEFT's issues are listed", "tissue 22",
                   "the frozen layer's cost", "a sessional", '@pytest.fixture(scope="session")',
                   "requests.Session()"):
        assert not _hits(phrase), phrase


def test_docs_readme_and_package_text_say_nothing_of_how_the_project_was_built():
    found = []
    for path in _files():
        for number, words, why in _hits(path.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{path.relative_to(ROOT)}:{number}: {words!r} ({why})")
    assert not found, "text about how the library was built, not about the library:\n" + "\n".join(found)


def test_scan_covers_every_docs_page():
    pages = {p for p in (ROOT / "docs").rglob("*.md")}
    assert pages and pages <= set(_files())


_INDEX_INSTALL = re.compile(r"""pip install (?:-\S+ )*["']?fourierft\[(\w+)\]""")


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
                                  *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_install_lines_name_the_clone_form_beside_the_index_form(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        for match in _INDEX_INSTALL.finditer(line):
            extra = match.group(1)
            near = "\n".join(lines[max(0, i - 2):i + 3])
            assert f'pip install -e ".[{extra}]"' in near, (
                f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()!r} names the package on an index only; give the "
                f'clone form (pip install -e ".[{extra}]") beside it')
