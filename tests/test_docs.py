"""The documentation holds together: every relative link and anchor in README.md and docs/
resolves, every `§` citation in the code names a section of a file in the repository, and
the README stays a README."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_DIRS = ("lems_core", "app_pages", "bench", "studies", "scripts")
# A citation names its file, then the section: `docs/reference/methods.md §1.2`.
CITATION = re.compile(r"([\w./-]+\.md)\s*§\s*(\d+(?:\.\d+)*)")
BARE_SECTION = re.compile(r"§\s*\d")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, outside fenced code blocks."""
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            anchors.add(github_slug(line.lstrip("#")))
    return anchors


def section_numbers(path: Path) -> set[str]:
    """Numbered headings of a markdown file: '## 1.2 Error surrogate' gives '1.2'."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if match:
            found.add(match.group(1))
    return found


def links_of(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in links_of(doc):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors_of(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.name}: {broken}"


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 15 * 1024
    assert "make app" in text and "make test" in text


def _code_files():
    for folder in CODE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else ()
    yield ROOT / "app.py"


def test_every_section_citation_in_the_code_names_an_existing_section():
    bad = []
    for path in _code_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not BARE_SECTION.search(line):
                continue
            cited = CITATION.findall(line)
            if len(cited) < len(BARE_SECTION.findall(line)):
                bad.append(f"{path.relative_to(ROOT)}:{number}: a § without its file")
            for file_name, section in cited:
                target = ROOT / file_name
                if not target.is_file():
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {file_name} is not in the repository")
                elif section not in section_numbers(target):
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {file_name} has no section {section}")
    assert not bad, "\n".join(bad[:40])
