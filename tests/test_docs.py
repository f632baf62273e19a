"""The documentation stays small and navigable: the README fits in a head and every link in README.md
and docs/ leads to a file (and heading) inside this repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
MAX_README_LINES = 300


def _without_code(text: str) -> str:
    """Markdown outside fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slugs(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated slug numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(_without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("//"):
            problems.append(f"{target}: leaves the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_relative_to(root) or "shared" in dest.relative_to(root).parts[:1]:
            problems.append(f"{target}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def test_readme_fits_in_a_head() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {MAX_README_LINES})"


def test_readme_sends_nobody_outside_the_repository() -> None:
    text = README.read_text()
    assert "://" not in text, "README.md names an address outside the repository"
    assert "../" not in text, "README.md points above the repository"
    assert broken_links(README) == []


def test_readme_links_every_docs_page() -> None:
    linked = {t.partition("#")[0] for t in LINK.findall(README.read_text())}
    missing = [p.name for p in DOCS if f"docs/{p.name}" not in linked]
    assert missing == [], f"README.md does not link {missing}"


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_broken_links_are_caught(tmp_path: Path) -> None:
    """The checker itself: each kind of bad link is reported."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "probe.md"
    page.write_text(
        "# Probe\n[ok](#probe) [a](https://example.org) [b](missing.md) [c](#nowhere) [d](../../etc/passwd)\n"
        "[e](../shared/x.md) `[not a link](https://x)`\n"
    )
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.md").write_text("# X\n")
    found = broken_links(page, root=tmp_path)
    expected = ["https", "missing.md", "#nowhere", "../../etc/passwd", "../shared/x.md"]
    assert [f.split(":")[0] for f in found] == expected, found


def _docgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docgen", ROOT / "tools" / "docgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_are_current() -> None:
    """The job-key and metric tables in docs/ are what tools/docgen.py renders from the code now."""
    stale = _docgen().stale()
    assert stale == [], f"{stale}: generated reference is stale; run `make docs` (python tools/docgen.py)"


def test_generated_references_cover_every_key_and_metric() -> None:
    from gradcomp import metrics
    from gradcomp.config.fed import FedJob
    from gradcomp.config.train import TrainJob

    jobs = (ROOT / "docs" / "jobs.md").read_text()
    assert "| `dp.clip` |" in jobs and "| `simulation.vectorize` |" in jobs and "| `krum` | `byzantine` |" in jobs
    assert all(f"| `{k}` |" in jobs for k in [*TrainJob.model_fields, *FedJob.model_fields])
    listed = (ROOT / "docs" / "metrics.md").read_text()
    assert all(f"| `{name}` |" in listed for name in metrics.metric_names())


def test_staleness_is_detected_and_fixed(tmp_path: Path) -> None:
    docgen = _docgen()
    (tmp_path / "docs").mkdir()
    for page in ("jobs.md", "metrics.md"):
        (tmp_path / "docs" / page).write_text((ROOT / "docs" / page).read_text())
    jobs = tmp_path / "docs" / "jobs.md"
    jobs.write_text(jobs.read_text().replace("| `dp.clip` |", "| `dp.clipping` |"))
    assert docgen.stale(tmp_path) == ["docs/jobs.md"]
    for path, (_, new) in docgen.render(tmp_path).items():
        path.write_text(new)
    assert docgen.stale(tmp_path) == []
    assert "| `dp.clip` |" in jobs.read_text()


def test_nothing_cites_issue_or_finding_numbers() -> None:
    """A comment says what it guards against; a tracker or audit number means nothing to a reader
    of this repository (docs/security.md's threat model collects the attacks instead)."""
    cite = re.compile(r"\b(?:issue|finding)s?\s+#?\d+", flags=re.I)
    roots = [ROOT / d for d in ("src", "tests", "benchmarks", "tools", "docs")]
    files = [README, *(p for r in roots for p in r.rglob("*") if p.suffix in {".py", ".md"})]
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        if "_proto" not in p.parts
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if cite.search(line)
    ]
    assert hits == [], "say what the code guards against instead:\n" + "\n".join(hits)


def test_every_stage_and_strategy_is_described() -> None:
    """The hand-written parts that name them keep up: the README's stage list and jobs.md's
    server-step table (the generated key table covers their keys)."""
    from gradcomp.compression.stages import STAGES
    from gradcomp.strategies import strategy_names

    stages_line = next(line for line in README.read_text().splitlines() if line.startswith("Stages: "))
    assert [s for s in STAGES if f"`{s}`" not in stages_line] == [], "README.md's 'Stages:' line misses a stage"
    jobs = (ROOT / "docs" / "jobs.md").read_text()
    server_steps = jobs[jobs.index("| `name` | server step |") :].split("\n\n")[0]
    missing = [n for n in strategy_names() if f"| `{n}` |" not in server_steps]
    assert missing == [], f"docs/jobs.md's server-step table misses {missing}"
