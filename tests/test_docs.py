"""The documentation stays usable: a README a newcomer reads in minutes, no comment pointing at a document
outside the repository or at a date, and every ``docs/method.md "Section"`` pointer in the code naming a
section that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("attnfd_pipeline", "stages", "configs", "tests", "scripts")


def _sources(tops=CODE):
    for top in tops:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in (".py", ".toml") and "__pycache__" not in path.parts and path.name != "test_docs.py":
                yield path


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_no_pointer_outside_the_repository_and_no_dates():
    bad = re.compile(r"SPEC §|TECH-NOTES|20[0-9]{2}-[01][0-9]-[0-3][0-9]")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _sources(("attnfd_pipeline", "stages", "configs"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_method_doc_pointers_name_existing_sections():
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", (ROOT / "docs" / "method.md").read_text(),
                                                         re.M)}
    pointer = re.compile(r'docs/method\.md "([^"]+)"(?: and "([^"]+)")?')
    named = {(p.relative_to(ROOT), " ".join(s.split())) for p in _sources()  # a name may wrap across lines
             for m in pointer.finditer(p.read_text(encoding="utf-8")) for s in m.groups() if s}
    assert named, "no pointers found: the pattern no longer matches how the code cites docs/method.md"
    assert sorted((str(p), s) for p, s in named if s not in headings) == []
