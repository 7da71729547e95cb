"""The Markdown pages link to files and headings that exist, and the README stays a page.

No Ray, no imports of posetune: plain text checks that run in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    {
        REPO / "README.md",
        REPO / "ARCHITECTURE.md",
        REPO / "benchmarks" / "README.md",
        REPO / "search_spaces" / "README.md",
        REPO / "cluster" / "README.md",
        *(REPO / "docs").glob("*.md"),
    }
)
README_MAX_BYTES = 9_000  # a user's page; the reference lives in docs/

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).+?\1")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings there are not Markdown)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    return [
        target
        for line in prose_lines(page.read_text())
        for target in LINK.findall(INLINE_CODE.sub("", line))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)  # https:, mailto:, ...: not checked here
    ]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.is_dir() or linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {path or page.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert page.exists(), page
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_readme_stays_a_page():
    size = len((REPO / "README.md").read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size:,} bytes, over {README_MAX_BYTES:,}: move reference to docs/"


def test_readme_keeps_the_python_api_section():
    assert "## From Python" in (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Storage: local, gs://, https://", "storage-local-gs-https"),
        ("`base`: what every trial starts from", "base-what-every-trial-starts-from"),
        ("From zero to browsing trials (GCP)", "from-zero-to-browsing-trials-gcp"),
        ("Model, loss, metrics", "model-loss-metrics"),
        ("What is tested here, and what is not", "what-is-tested-here-and-what-is-not"),
    ],
)
def test_github_anchor_rule(heading, anchor):
    assert github_anchor(heading) == anchor


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](other.md#other-page) [ok](#title) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#not-a-heading) `[code](ignored.md)`\n"
        "```\n[in a fence](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#not-a-heading: no heading #not-a-heading in other.md",
    ]
