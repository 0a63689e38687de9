"""The documentation keeps what the README once said, and its site lists every page.

The README was the whole reference until the documentation site (``docs/``, ``mkdocs.yml``) took it over; each
of its sections, and each paragraph it opened with a bold title, has a page now. The table below is that move:
a section renamed or moved to another page changes its row here, and a section dropped fails. The site's build
(``make docs``, ``mkdocs build --strict``) checks links and anchors; it is a CI step of its own, and this test
reads files only.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"
README = ROOT / "README.md"
CLIENT = ROOT / "client" / "__init__.py"
#: the README of first steps stays short (the issue that moved the reference out asked for about 200 lines)
README_MAX_LINES = 250

#: each ``##``/``###`` heading of the README before the move -> (the file it lives in now, its heading there)
SECTIONS = {
    "Two commands": ("README.md", "Two commands"),
    "Quick start: three ways in": ("README.md", "Quick start: three ways in"),
    "Game code": ("docs/client.md", "Game code"),
    "The service: `proto/clemserve/v1/clemserve.proto`": (
        "docs/protocol.md",
        "The service: `proto/clemserve/v1/clemserve.proto`",
    ),
    "Running the server": ("docs/install.md", "Running the server"),
    "In a container": ("docs/deploy.md", "In a container"),
    "Backends": ("docs/backends.md", "Backends"),
    "Residency: which models stay loaded": ("docs/residency.md", "Residency: which models stay loaded"),
    "Many game processes, one server": ("docs/many-processes.md", "Many game processes, one server"),
    "Streaming replies": ("docs/many-processes.md", "Streaming replies"),
    "Restarts: what a game sees": ("docs/many-processes.md", "Restarts: what a game sees"),
    "Metrics": ("docs/metrics.md", "Metrics"),
    "Security": ("docs/security.md", "Security"),
    "Keys and remote failures": ("docs/security.md", "Keys and remote failures"),
    "Running clembench games against clemserve": ("docs/clembench.md", "Running clembench games against clemserve"),
    "Run a benchmark faster": ("docs/clembench.md", "Run a benchmark faster"),
    "Other languages and tools": ("docs/protocol.md", "Other languages and tools"),
    "Command line": ("docs/cli.md", "Command line"),
    "Scale-out": ("docs/scale-out.md", "Scale-out"),
    "Compatibility notes (where clemserve differs from in-process clembench)": (
        "docs/compatibility.md",
        "Compatibility notes (where clemserve differs from in-process clembench)",
    ),
    "Development": ("docs/development.md", "Development"),
}

#: the README's paragraphs that opened with a bold title -> (their page, their heading there)
PARAGRAPHS = {
    "Input limits.": ("docs/install.md", "Input limits"),
    "Registry.": ("docs/backends.md", "The registry"),
    "Health.": ("docs/install.md", "Health"),
    "Transformers on GPUs": ("docs/backends.md", "Transformers on GPUs"),
    "vLLM.": ("docs/backends.md", "vLLM"),
    "llama.cpp.": ("docs/backends.md", "llama.cpp"),
    "Vision-language models": ("docs/backends.md", "Vision-language models"),
    "slurk": ("docs/backends.md", "slurk"),
    "Budget.": ("docs/residency.md", "Budget"),
    "Estimate.": ("docs/residency.md", "Estimate"),
    "Each batch is admitted again.": ("docs/residency.md", "Each batch is admitted again"),
    "Measured.": ("docs/residency.md", "Measured"),
    "GPU checks at admission.": ("docs/residency.md", "GPU checks at admission"),
    "Eviction.": ("docs/residency.md", "Eviction"),
    "Keep-alive.": ("docs/residency.md", "Keep-alive"),
    "Leases.": ("docs/residency.md", "Leases"),
    "Load bounds.": ("docs/residency.md", "Load bounds"),
    "Cache key.": ("docs/residency.md", "Cache key"),
    "Remote models.": ("docs/many-processes.md", "Remote models"),
    "Labels are bounded and hold no secrets.": ("docs/metrics.md", "Labels are bounded and hold no secrets"),
    "Tokens.": ("docs/security.md", "Tokens"),
    "TLS.": ("docs/security.md", "TLS"),
    "Clients.": ("docs/security.md", "Clients"),
    "Safe loading.": ("docs/security.md", "Safe loading"),
}

#: the topics the documentation has a page for, each in the site's navigation
TOPIC_PAGES = (
    "install.md",
    "client.md",
    "clembench.md",
    "backends.md",
    "residency.md",
    "many-processes.md",
    "metrics.md",
    "security.md",
    "deploy.md",
    "scale-out.md",
    "protocol.md",
    "compatibility.md",
    "cli.md",
    "development.md",
    "benchmarks.md",
    "api.md",
)


def headings(path: Path) -> set[str]:
    """The text of every Markdown heading in ``path``, outside fenced code."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+?)\s*#*\s*$", line)):
            found.add(match.group(1))
    return found


def nav_pages() -> list[str]:
    """The pages that ``mkdocs.yml``'s nav names (``Title: page.md`` or ``- page.md``), relative to docs/."""
    text = MKDOCS.read_text()
    nav = text[text.index("\nnav:") :]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", nav, re.M)


def not_in_nav() -> list[str]:
    """``mkdocs.yml``'s not_in_nav patterns: pages that may be built without a place in the nav."""
    match = re.search(r"^not_in_nav: \|\n((?:[ \t]+\S.*\n)+)", MKDOCS.read_text(), re.M)
    return [line.strip() for line in match.group(1).splitlines()] if match else []


@pytest.mark.parametrize("old", sorted(SECTIONS))
def test_every_section_of_the_old_readme_has_a_page(old: str) -> None:
    page, heading = SECTIONS[old]
    path = ROOT / page
    assert path.is_file(), f"{old!r} moved to {page}, which is missing"
    assert heading in headings(path), f"{page} has no heading {heading!r} (the README's {old!r})"


@pytest.mark.parametrize("old", sorted(PARAGRAPHS))
def test_every_titled_paragraph_of_the_old_readme_has_a_heading(old: str) -> None:
    page, heading = PARAGRAPHS[old]
    assert heading in headings(ROOT / page), f"{page} has no heading {heading!r} (the README's **{old}**)"


def test_the_readme_is_a_page_of_first_steps() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move reference text into docs/"


def test_the_readmes_links_reach_files() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to no page of the documentation"
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_the_nav_lists_every_page_and_only_pages_that_exist() -> None:
    listed = nav_pages()
    assert len(listed) == len(set(listed)), "a page is listed twice"
    assert [page for page in listed if not (DOCS / page).is_file()] == []
    exempt = not_in_nav()
    pages = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    unlisted = [p for p in pages if p not in listed and not any(fnmatch.fnmatch(p, pattern) for pattern in exempt)]
    assert unlisted == [], f"pages missing from mkdocs.yml's nav: {unlisted}"


def test_every_topic_has_its_page() -> None:
    assert [page for page in TOPIC_PAGES if page not in nav_pages()] == []


def test_the_api_reference_shows_every_public_name_of_the_client() -> None:
    """docs/api.md renders each name of ``clemserve.client.__all__`` from its docstring (``::: clemserve.client.X``)."""
    (exported,) = [
        ast.literal_eval(node.value)
        for node in ast.parse(CLIENT.read_text()).body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    ]
    shown = set(re.findall(r"^::: clemserve\.client\.(\w+)\s*$", (DOCS / "api.md").read_text(), re.M))
    assert sorted(set(exported) - shown) == [], "names of clemserve.client.__all__ missing from docs/api.md"
