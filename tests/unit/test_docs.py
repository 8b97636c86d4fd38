"""The docs a newcomer enters: a short README with links that resolve, topic pages under docs/,
docs/architecture.md, and no reference to a document the repository does not hold."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 14_000, f"README.md is {len(readme.encode())} bytes"
    for page in ("architecture", "configuration", "failure-modes", "parallelism", "checkpointing", "multi-node",
                 "data", "models", "observability", "BENCHMARKS"):
        assert f"docs/{page}.md" in readme and (REPO / "docs" / f"{page}.md").exists(), page


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_no_file_refers_to_a_design_document_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    name = "DESIGN" + ".md"  # spelt apart so that this file does not name it
    mentions = [f for f in files if (REPO / f).is_file() and not f.endswith(".png")
                and name in (REPO / f).read_text(errors="ignore")]
    assert not mentions, mentions
