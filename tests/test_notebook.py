"""The notebook in docs/ runs top to bottom, in a real Jupyter kernel, against an atlas built here."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "docs" / "python.ipynb"


class _Tags(HTMLParser):
    """Every tag and attribute of an HTML output (escaped data never shows up as either)."""

    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)


def test_the_python_notebook_runs_and_renders(tiny_atlas, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("FEATUREATLAS_ATLAS", str(tiny_atlas))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any error
    outputs = {cell.source.splitlines()[0]: cell.outputs for cell in notebook.cells if cell.cell_type == "code"}
    html = {first: [o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {})] for first, outs in outputs.items()}
    search = html['hits = atlas.search("kings and queens", k=8)'][0]
    assert "Features for “kings and queens”" in search and search.count("matched by") == 8
    feature = html['top = next(h["feature_id"] for h in hits if h["density"] > 0)  # the best hit that fired on the corpus'][0]
    assert "Top examples" in feature and "background: rgba(" in feature  # shaded tokens
    for page in (h for pages in html.values() for h in pages):
        tags = _Tags()
        tags.feed(page)
        assert "script" not in tags.tags and not any(a.startswith("on") for a in tags.attributes)
    printed = "".join(o.get("text", "") for o in outputs["import torch"] if o["output_type"] == "stream")
    assert "decoder: (64, 64)" in printed
