"""docs/PERF.md is a reference page: under 20 KB, every figure row linked to its artefact, every link into
docs/perf/ resolving to a file there, and docs/perf/ holding only files that some link reaches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PERF = DOCS / "PERF.md"
ARTEFACTS = DOCS / "perf"
MAX_BYTES = 20_000
NO_FIGURE = ("not run", "not measured", "open")
"""Status cells of target rows that have no measurement to link."""

INLINE = re.compile(r"\]\(([^)\s]+)\)")
REFERENCE_USE = re.compile(r"\]\[([^\]]+)\]")
REFERENCE_DEF = re.compile(r"^\[([^\]]+)\]:\s*(\S+)", re.M)


def links(text: str) -> list[str]:
    """Every link target in a Markdown text, inline and reference-style, without #anchors."""
    targets = INLINE.findall(text) + [target for _, target in REFERENCE_DEF.findall(text)]
    return [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#"))]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def resolved(doc: Path, target: str) -> Path:
    return (doc.parent / target).resolve()


def artefact_links() -> set[Path]:
    """Paths under docs/perf/ that some Markdown file of the repository links to."""
    found = set()
    for doc in markdown_files():
        for target in links(doc.read_text()):
            path = resolved(doc, target)
            if path == ARTEFACTS or ARTEFACTS in path.parents:
                found.add(path)
    return found


def test_the_page_is_under_20_kb():
    size = len(PERF.read_bytes())
    assert size < MAX_BYTES, f"docs/PERF.md is {size} bytes; keep it under {MAX_BYTES} (replace superseded runs)"


def test_every_link_of_the_page_and_into_docs_perf_resolves():
    checked = [(PERF, target) for target in links(PERF.read_text())]
    checked += [(doc, target) for doc in markdown_files() for target in links(doc.read_text())
                if "perf/" in target]
    broken = [f"{doc.relative_to(ROOT)} -> {target}" for doc, target in checked if not resolved(doc, target).exists()]
    assert broken == [], f"links that resolve to nothing: {broken}"


def test_every_artefact_is_linked():
    linked = artefact_links() - {ARTEFACTS}  # a link to a run's folder covers its files; one to docs/perf/ does not
    files = [p for p in ARTEFACTS.rglob("*") if p.is_file()]
    unlinked = [str(p.relative_to(ROOT)) for p in files if p not in linked and not linked & set(p.parents)]
    assert files, "docs/perf/ holds no artefacts"
    assert unlinked == [], f"artefacts no figure links (link them or git rm them): {unlinked}"


def test_reference_links_are_defined_and_used():
    text = PERF.read_text()
    defined = {name for name, _ in REFERENCE_DEF.findall(text)}
    used = set(REFERENCE_USE.findall(text))
    assert used - defined == set(), f"reference links without a definition: {used - defined}"
    assert defined - used == set(), f"definitions nothing uses: {defined - used}"


def data_rows(text: str) -> list[str]:
    """The data rows of every table (after its separator), NEW RUNS marker rows left out."""
    rows, in_table = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        if re.fullmatch(r"\|[-|\s]+\|", line):
            in_table = True  # the rows after the separator are data
            continue
        if in_table and "NEW RUNS" not in line:
            rows.append(line)
    return rows


def test_every_figure_row_links_its_artefact():
    text = PERF.read_text()
    rows = data_rows(text)
    assert len(rows) > 20
    unlinked = [row for row in rows if not (INLINE.search(row) or REFERENCE_USE.search(row))
                and row.rstrip(" |").rsplit("|", 1)[-1].strip() not in NO_FIGURE]
    assert unlinked == [], f"table rows with figures but no artefact link: {unlinked}"


def test_each_section_leaves_a_place_for_new_runs():
    sections = re.split(r"^## ", PERF.read_text(), flags=re.M)[1:]
    questions = [s for s in sections if not s.startswith(("Targets", "Measured and dropped"))]
    assert questions, "no question sections"
    missing = [s.splitlines()[0] for s in questions if "NEW RUNS" not in s]
    assert missing == [], f"sections without a NEW RUNS marker: {missing}"


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.name)
def test_anchors_into_perf_md_exist(doc):
    headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", PERF.read_text(), re.M)}
    anchors = re.findall(r"PERF\.md#([\w\-]+)", doc.read_text())
    assert [a for a in anchors if a not in headings] == []
