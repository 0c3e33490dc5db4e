"""Every relative link in README.md and docs/**/*.md points at a file that exists, and every `#anchor`
at a heading of that file (GitHub's heading ids), so that moving or renaming a page cannot leave a
dead link behind."""

from __future__ import annotations

import glob
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)])
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks, with inline code spans blanked out."""
    out, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                fenced = not fenced
                continue
            if not fenced:
                out.append((number, re.sub(r"`[^`]*`", "``", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    kept = [c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN"]
    return "".join(kept).replace(" ", "-")


def anchors(path: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines_raw(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def prose_lines_raw(path: str) -> list[tuple[int, str]]:
    """Like prose_lines, but keeping inline code: a heading's id includes the text of its code spans."""
    out, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                fenced = not fenced
            elif not fenced:
                out.append((number, line))
    return out


def links(path: str) -> list[tuple[int, str]]:
    return [(number, m.group(1)) for number, line in prose_lines(path) for m in LINK.finditer(line)]


def test_the_pages_are_found():
    names = {os.path.relpath(p, ROOT) for p in PAGES}
    assert "README.md" in names and len(names) > 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page: str):
    dead = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        where = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(where):
            dead.append(f"line {number}: {target} (no file {os.path.relpath(where, ROOT)})")
        elif anchor and where.endswith(".md") and anchor not in anchors(where):
            dead.append(f"line {number}: {target} (no heading #{anchor} in {os.path.relpath(where, ROOT)})")
    assert not dead, f"{os.path.relpath(page, ROOT)}:\n" + "\n".join(dead)


def test_the_slugs_match_githubs():
    assert slug("Capture (`bench/capture.py`)") == "capture-benchcapturepy"
    assert slug("5. Hidden states (`hidden/`, Zarr v3)") == "5-hidden-states-hidden-zarr-v3"
    assert slug("Which targets?") == "which-targets"
    assert slug("Calibration (CPU scale, 6 seeds; real teacher, 4 seeds)") == \
        "calibration-cpu-scale-6-seeds-real-teacher-4-seeds"
