"""The documentation holds together: every relative Markdown link in README.md and docs/*.md names a file (or
folder) that exists, a `file.md#anchor` link names a heading of that file (GitHub's slug), and README.md stays
short, the rest being in docs/. Pure file reading: no model, no server."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 150

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"); the text may hold code spans, not brackets.
LINK = re.compile(r"\[[^\[\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a shell comment in a ```bash block is not a heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the page's prose; code spans keep their text but lose their
    backticks, so a link whose text is code is still seen, and brackets inside code are not links."""
    found = []
    fenced = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = CODE_SPAN.sub(lambda m: m.group(2).replace("[", "").replace("]", "").replace("(", "").replace(")", ""),
                             line)
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
    return found


def broken(page: Path, root: Path = REPO) -> list[str]:
    """One line per link of the page that names no file under root, or no heading of the page it names."""
    problems = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto: ... : not a file of this repository
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(root)}:{number}: {target}"
        resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
        name = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
        if not resolved.is_relative_to(root) or not resolved.exists():
            problems.append(f"{where}: no such file {name} in the repository")
            continue
        if anchor and resolved.suffix == ".md" and resolved.is_file() and unquote(anchor) not in anchors(resolved):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    assert links(page) or page.name == "configuration.md", f"{page.name} links nowhere: is the link pattern right?"
    assert broken(page) == []


def test_the_readme_is_short() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}: move the rest to docs/"


def test_the_readme_links_every_docs_page() -> None:
    readme = {target.partition("#")[0] for _, target in links(REPO / "README.md")}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert missing == [], f"README.md's Documentation list lacks {missing}"


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Metrics", "metrics"),
    ("A model by name: `pull`", "a-model-by-name-pull"),
    ("Several choices (`n` > 1)", "several-choices-n--1"),
    ("How llama-cpp-python is built, and why", "how-llama-cpp-python-is-built-and-why"),
    ("The router's environment", "the-routers-environment"),
    ("A `/generate` answer", "a-generate-answer"),
])
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_broken_link_and_a_stale_anchor_are_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Its part\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#its-part) [gone](missing.md) [stale](other.md#not-a-heading) [self](#page)\n"
                    "`[code](not-a-link.md)` [web](https://example.com/x.md)\n\n# Page\n")
    problems = broken(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "no such file missing.md" in problems[0] and "#not-a-heading" in problems[1]
