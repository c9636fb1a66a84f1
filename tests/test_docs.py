"""Every reference in the project resolves inside the project.

Comments, docstrings and tests cite the model and the contract by section ("docs/semantics.md
§3.5"). A reader of a clone or of the sdist must find each one: no reference may point outside
the repository, name a page of docs/ that does not exist, or a section that page does not have.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ""}
# Where the sdist keeps the project (pyproject.toml [tool.hatch.build.targets.sdist]), for a
# checkout without git.
SOURCE_ROOTS = ("sppjit", "kernels", "datasets", "tests", "docs", ".ci", "cli.py",
                "hatch_build.py", "README.md", "pyproject.toml")

# A path out of the repository into a sibling "shared" folder, written in pieces so that this
# file does not match itself.
OUTSIDE = re.compile(r"(?:\.\./)+" + "shared" + r"\b|/work/" + "shared")
DOC_PATH = re.compile(r"\bdocs/([\w./-]*\w)")
SECTION = r"§(\d+(?:\.\d+)*)"
# A path followed by its sections: "docs/x.md §3", "§1-§3", "§4, §8.1", "§2 and §5".
CITED = re.compile(r"\bdocs/([\w./-]*\.md)((?:\s*(?:,|and|-|to)?\s*" + SECTION + r")*)")
# A page named on a line: a docs path, or the target of a Markdown link in docs/.
NAMED = re.compile(r"\bdocs/([\w./-]*\.md)|\]\(([\w./-]*\.md)\)")
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_files() -> list[Path]:
    """The files git tracks; without git (an sdist), every file of the source roots."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for top in SOURCE_ROOTS:
            path = ROOT / top
            if path.is_file():
                names.append(top)
            for base, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
                names += [os.path.relpath(os.path.join(base, f), ROOT) for f in files]
    return [ROOT / n for n in names if Path(n).suffix in TEXT_SUFFIXES and (ROOT / n).is_file()]


def sections(page: Path) -> set[str]:
    """The numbered sections of a docs page: "3", "3.5", ..."""
    return set(HEADING.findall(page.read_text(encoding="utf-8")))


def problems(text: str, where: str, docs: Path = DOCS, own_page: str | None = None) -> list[str]:
    """What is wrong with the references in ``text`` (a file's contents; ``where`` its name).

    ``own_page`` is the docs page ``text`` is, if it is one: its bare "§N" refer to itself.
    Elsewhere a bare "§N" refers to the last docs page named before it on the same line, and
    one with no page on its line is an error (which document?)."""
    found = []
    cache: dict[str, set[str] | None] = {}

    def known(name: str) -> set[str] | None:
        if name not in cache:
            page = docs / name
            cache[name] = sections(page) if page.is_file() else None
        return cache[name]

    for lineno, line in enumerate(text.splitlines(), 1):
        at = f"{where}:{lineno}"
        if OUTSIDE.search(line):
            found.append(f"{at}: points outside the repository: {line.strip()}")
        for m in DOC_PATH.finditer(line):
            target = docs / m.group(1)
            if not target.exists():
                found.append(f"{at}: no such file: docs/{m.group(1)}")
        covered: set[int] = set()
        for m in CITED.finditer(line):
            name = m.group(1)
            have = known(name)
            if have is None:
                continue  # reported above
            for s in re.finditer(SECTION, m.group(2)):
                covered.add(m.start(2) + s.start())
                if s.group(1) not in have:
                    found.append(f"{at}: docs/{name} has no section §{s.group(1)}")
        for s in re.finditer(SECTION, line):
            if s.start() in covered:
                continue
            before = [m.group(1) or m.group(2) for m in NAMED.finditer(line[:s.start()])]
            name = before[-1] if before else own_page
            if name is None:
                found.append(f"{at}: §{s.group(1)} names no docs page on its line")
                continue
            have = known(name)
            if have is not None and s.group(1) not in have:
                found.append(f"{at}: docs/{name} has no section §{s.group(1)}")
        if own_page is not None:
            for link in LINK.findall(line):
                if "://" not in link and not (docs / link).exists():
                    found.append(f"{at}: broken link: {link}")
    return found


def test_every_reference_resolves():
    found = []
    for path in tracked_files():
        if path == Path(__file__).resolve():
            continue  # its own examples below are meant to be wrong
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        own = path.name if path.parent == DOCS else None
        found += problems(text, str(path.relative_to(ROOT)), own_page=own)
    assert not found, "\n".join(found)


def test_docs_pages_exist_and_are_numbered():
    for page in ("semantics.md", "contract.md"):
        assert {"1", "2", "3"} <= sections(DOCS / page), page
    assert (DOCS / "README.md").is_file()


@pytest.mark.parametrize("text, expected", [
    ("see docs/semantics.md §3.5", []),
    ("see docs/semantics.md §3.5 and §99", ["has no section §99"]),
    ("docs/semantics.md §1-§3 and docs/contract.md §5.2", []),
    ("docs/contract.md §5.2, §5.9", ["has no section §5.9"]),
    ("docs/semantics.md §4 (and §3 for v4), then §42", ["has no section §42"]),
    ("docs/nosuch.md", ["no such file: docs/nosuch.md"]),
    ("# a bare §3 in code", ["names no docs page"]),
    ("see " + "../" + "shared" + "/spec/semantics.md", ["points outside"]),
    ("see " + "/work/" + "shared" + "/research/x.md", ["points outside"]),
])
def test_checker_finds_bad_references(text, expected):
    """The checker itself: a good reference passes, each kind of bad one is reported."""
    found = problems(text, "x.py")
    assert len(found) == len(expected), found
    for message, part in zip(found, expected):
        assert part in message


def test_checker_reads_a_page_own_sections(tmp_path):
    (tmp_path / "a.md").write_text("## 1. One\n\n### 1.1 Sub\n\nsee §1.1 and §2\n[b](b.md)\n")
    found = problems((tmp_path / "a.md").read_text(), "a.md", docs=tmp_path, own_page="a.md")
    assert [f.split(": ", 1)[1] for f in found] == ["docs/a.md has no section §2",
                                                    "broken link: b.md"]
