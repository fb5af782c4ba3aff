"""The documentation, read from its source: the README stays a front page (at most 300 lines) that links every page
of docs/, and every relative link in the README and docs/ reaches a file, and a heading where it names one (GitHub's
anchors). Absolute http(s) links are not followed: nothing here touches the network."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [
    "usage",
    "models",
    "serving",
    "structured-output",
    "kv-cache",
    "tensor-parallelism",
    "speculative-decoding",
    "architecture",
    "benchmarks",
    "testing",
]
DOCS = [README] + sorted((ROOT / "docs").glob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)  # code blocks: no links, no headings
CODE = re.compile(r"`[^`]*`")  # inline code (which may run over a line break): no links


def _prose(path: Path) -> str:
    return CODE.sub("", FENCE.sub("", path.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`), spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", path.read_text()), re.MULTILINE):
        slug, n = _slug(heading), 0
        while (anchor := slug if n == 0 else f"{slug}-{n}") in anchors:  # a repeated heading gets -1, -2, ...
            n += 1
        anchors.add(anchor)
    return anchors


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path)) if not re.match(r"[a-z]+:", t)]  # http(s), mailto: not followed


def test_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES)
def test_each_docs_page_exists_and_the_readme_links_it(page):
    assert (ROOT / "docs" / f"{page}.md").is_file()
    assert f"docs/{page}.md" in {t.split("#")[0] for t in _links(README)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in _links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_the_slugs_follow_github():
    assert _slug("Semantics, and where they differ from Meta's reference") == (
        "semantics-and-where-they-differ-from-metas-reference"
    )
    assert _slug("Serving (bench_serving.py)") == "serving-bench_servingpy"
    assert _slug("GGUF files at real sizes: Llama-3.2-1B") == "gguf-files-at-real-sizes-llama-32-1b"
