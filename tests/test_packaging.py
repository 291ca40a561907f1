"""What a non-editable install ships: setuptools takes only the packages pyproject lists, so a new
package folder left out of the list imports in development (an editable install reads the tree)
and fails for every user of the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(tool["packages"]), tool["package-dir"]

    def folder(package: str) -> Path:
        parent, _, last = package.rpartition(".")
        return ROOT / folders[package] if package in folders else folder(parent) / last

    assert all((folder(p) / "__init__.py").is_file() for p in listed)
    roots = {folder(p) for p in listed}
    found = {init.parent for base in ("api", "ingest", "store") for init in (ROOT / base).rglob("__init__.py")}
    assert found <= roots, sorted(str(f.relative_to(ROOT)) for f in found - roots)
