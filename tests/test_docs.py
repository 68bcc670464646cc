"""The repository explains itself: comments cite files a reader of the repository can open.

    .venv/bin/python -m pytest -q tests/test_docs.py

Every tracked text file is checked for citations of notes that live outside the repository (the
shared `stack.md` / `reference-behaviour.md` notes) and of issue numbers; the facts belong in
docs/ (docs/README.md lists them), in our own words. Every `docs/<file>.md#<section>` citation
must name an existing file and one of its headings.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".html", ".service"}
# A bare `stack.md` outside docs/ means the shared notes; inside docs/ it is a relative link.
OUTSIDE_NOTE = re.compile(r"reference-behaviou?r\.md|shared/notes|(?<![\w/])stack\.md")
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|\(#\d+\)", re.IGNORECASE)
DOC_CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")


def _tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):   # a source tree without git: walk it
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not {".venv", ".git"} & set(p.relative_to(REPO).parts)]
    this = str(Path(__file__).resolve().relative_to(REPO))
    return sorted(n for n in names if Path(n).suffix in TEXT_SUFFIXES and n != this and (REPO / n).is_file())


def bad_citations(name: str, text: str) -> list[str]:
    """'path:line: text' for each line of `text` that cites an outside note or an issue number."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        outside = OUTSIDE_NOTE.search(line) if not name.startswith("docs/") else None
        if outside or ISSUE_NUMBER.search(line):
            found.append(f"{name}:{number}: {line.strip()}")
    return found


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_no_citation_of_notes_outside_the_repository_or_of_issue_numbers():
    found = [hit for name in _tracked_text_files()
             for hit in bad_citations(name, (REPO / name).read_text(errors="replace"))]
    assert not found, "cite docs/<file>.md or state the fact instead:\n" + "\n".join(found)


def test_every_docs_citation_names_a_file_and_a_heading_that_exist():
    docs = {p.name: heading_anchors(p.read_text()) for p in (REPO / "docs").glob("*.md")}
    broken = []
    for name in _tracked_text_files():
        for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1):
            for file, anchor in DOC_CITATION.findall(line):
                if file not in docs or (anchor and anchor not in docs[file]):
                    broken.append(f"{name}:{number}: docs/{file}{'#' + anchor if anchor else ''}")
    assert not broken, "no such docs file or heading:\n" + "\n".join(broken)


def test_the_rules_catch_what_they_are_for():
    assert bad_citations("core/x.py", "# see stack.md for why")
    assert bad_citations("core/x.py", '"""(reference-behaviour.md, Model)"""')
    assert bad_citations("bench/x.py", "Setup (issue 13): d4")
    assert bad_citations("docs/x.md", "as issue #19 asked")
    assert not bad_citations("core/x.py", "# why: docs/versions.md#prefect-3")
    assert not bad_citations("docs/README.md", "| [versions.md](versions.md) | pins |")
    assert "chat-sft-and-tools" in heading_anchors("## Chat, SFT and tools")
