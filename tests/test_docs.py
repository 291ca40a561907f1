"""The documentation site: it builds with every link and anchor resolved, its references are generated
from the code, and every command the getting-started pages show is one the CLI accepts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from featureatlas.api.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# What a getting-started page may ask a newcomer to type besides featureatlas and scripts/.
SHELL = {"source", "cd", "ls", "cat", "mkdir", "export"}
README_LINES = 160


def _commands(page: Path) -> list[str]:
    """Each command of the page's fenced bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_site_builds_strict_with_its_generated_references(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (site / "reference" / "cli.html").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert all(f"featureatlas {name}" in cli for name in sub.choices)  # every command has its section
    assert "--d-sae" in cli and "--llm-url" in cli
    http = (site / "reference" / "http.html").read_text()
    assert "/api/search" in http and "/api/sql" in http and "ErrorBody" in http and "Liveness" in http  # handler docs
    assert "label_candidates" in (site / "reference" / "tables.html").read_text()
    assert "label_scorers" in (site / "reference" / "config.html").read_text()
    assert "OpenAtlas" in (site / "reference" / "python.html").read_text()


def test_every_page_on_disk_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages and all(page in nav for page in pages), sorted(p for p in pages if p not in nav)


@pytest.mark.parametrize("page", sorted((DOCS / "getting-started").glob("*.md")), ids=lambda p: p.name)
def test_getting_started_commands_are_real(page):
    commands = _commands(page)
    assert commands
    for command in commands:
        words = shlex.split(command)
        if words[0] == "featureatlas":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit as e:  # argparse's way of refusing, and of ending after --help (code 0)
                if e.code != 0:
                    pytest.fail(f"{page.name}: the CLI refuses {command!r} (exit {e.code})")
        elif words[0].startswith("scripts/"):
            assert os.access(ROOT / words[0], os.X_OK), f"{page.name}: no script {words[0]}"
        else:
            assert words[0] in SHELL, f"{page.name}: {command!r} is neither featureatlas, a script nor a shell basic"


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES
    nav = (ROOT / "mkdocs.yml").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]

    def resolves(target: str) -> bool:  # a file, or a page the site generates (the strict build checks those)
        return (ROOT / target).exists() or (target.startswith("docs/") and f": {target.removeprefix('docs/')}" in nav)

    assert local and all(resolves(t) for t in local), [t for t in local if not resolves(t)]
