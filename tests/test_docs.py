"""The README and the documentation pages link only to files and sections that exist.

`mkdocs build --strict` checks the site's pages too, but needs MkDocs and does not read the
README; this test runs with the default suite and covers both, as GitHub renders them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 350

# [text](target) and ![alt](target); the target ends at whitespace or the closing bracket,
# so a title ("...") after it is left out.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$')


def documentation_files() -> list[Path]:
    """README.md, CHANGELOG.md and every Markdown page under docs/."""
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str, keep_inline_code: bool = False) -> list[str]:
    """The lines outside fenced code blocks; inline code removed unless kept (links there
    are text, but headings may contain it)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line if keep_inline_code else INLINE_CODE.sub("", line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs' default table of contents give a plain-text heading."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8"), keep_inline_code=True):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file, or #section of a Markdown file, is missing."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                problems.append(f"{path.name}: link {target!r}: no file {resolved}")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                problems.append(f"{path.name}: link {target!r}: no heading #{fragment}")
    for line in text.splitlines():
        included = SNIPPET.match(line)
        if included and not (ROOT / included.group(1)).exists():
            problems.append(f"{path.name}: includes {included.group(1)!r}, which does not exist")
    return problems


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_sections(path: Path) -> None:
    assert broken_links(path) == []


def test_readme_stays_a_short_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_page_under_docs_is_in_the_mkdocs_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages == listed


def test_a_missing_file_and_a_missing_section_are_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-section) [web](https://example.org/x.md) `[code](gone.md)`\n"
        "[gone](gone.md) [no section](other.md#missing)\n"
        "```\n[in a fence](also-gone.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 2
    assert "'gone.md'" in problems[0]
    assert "#missing" in problems[1]


def test_slug_matches_the_anchors_the_docs_link_to() -> None:
    assert slug("The demo's numbers") == "the-demos-numbers"
    assert slug("Configuration: `protoseg.config`") == "configuration-protosegconfig"
    assert slug("Multi-GPU and multi-node training") == "multi-gpu-and-multi-node-training"
    assert slug("Data loading: a recipe's loaders alone") == "data-loading-a-recipes-loaders-alone"
