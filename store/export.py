"""An atlas in the formats other tools read (``featureatlas export``).

- ``parquet``: every table, one Parquet file each, plus the manifest. LanceDB's tables (features
  with their vectors, examples, windows with their embeddings) come whole from LanceDB; the tables
  only DuckDB holds (documents, tokens, activations, label candidates, dictionaries, families) from
  DuckDB. Written in bounded batches, so an atlas of any size exports in constant memory.
- ``saelens``: the dictionary folder is already SAELens's layout (``cfg.json`` and
  ``sae_weights.safetensors``, which ``sae_lens.SAE.load_from_disk`` reads); exporting copies it.
  A stack of dictionaries trained apart (``--widths``) is one file SAELens cannot read as one
  dictionary: it exports as a folder per dictionary, each a slice of the stack's tensors.
- ``neuronpedia``: Neuronpedia's feature batches and explanations (``store.neuronpedia``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import manifest as M
from .atlas import Atlas
from .dictionaries import dictionary_id, saelens_cfg, stacked_parts
from .errors import BadParameter
from .schema import DUCKDB_TABLES

FORMATS = ("neuronpedia", "parquet", "saelens")
# Rows per batch read and written: a batch of features with 2,304-wide decoders is ~100 MB.
BATCH_ROWS = 10_000
# Tables read from LanceDB (whole rows: vectors and embeddings included); the rest from DuckDB.
LANCE_TABLES = ("features", "examples", "windows")
DUCKDB_ONLY = tuple(t.name for t in DUCKDB_TABLES if t.name not in LANCE_TABLES)


def export(atlas: Atlas, fmt: str, out: Path) -> list[Path]:
    """Write ``atlas`` in format ``fmt`` under ``out`` (created; files already there are replaced)."""
    if fmt not in FORMATS:
        raise BadParameter("--format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadParameter("--out", f"{out} is a file; give a folder")
    if out.resolve() == atlas.root.resolve() or atlas.root.resolve() in out.resolve().parents:
        raise BadParameter("--out", f"{out} is inside the atlas; export somewhere else")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        return write_parquet(atlas, out)
    if fmt == "saelens":
        return write_saelens(atlas, out)
    from .neuronpedia import write_neuronpedia

    return write_neuronpedia(atlas, out)


def write_parquet(atlas: Atlas, out: Path) -> list[Path]:
    """``<table>.parquet`` for every table and ``manifest.json``."""
    written = []
    for name in (n for n in LANCE_TABLES if atlas.has_table(n)):  # atlases of older versions lack some tables
        table = getattr(atlas, name)
        written.append(_write(out / f"{name}.parquet", table.schema, _lance_batches(table)))
    for name in (n for n in DUCKDB_ONLY if n in atlas.duckdb_tables):
        cur = atlas.batch_connection()
        try:
            reader = cur.sql(f"select * from {name}").to_arrow_reader(BATCH_ROWS)  # a declared name, not input
            written.append(_write(out / f"{name}.parquet", reader.schema, reader))
        finally:
            cur.close()
    M.write(out, atlas.manifest)  # the manifest of the parts exported, even if the atlas was republished since
    return [*written, out / M.MANIFEST]


def write_saelens(atlas: Atlas, out: Path) -> list[Path]:
    """The dictionary's two files, as they are (they are SAELens's layout already); for a stack,
    ``<dictionary id>/`` with the two files of each of its dictionaries."""
    parts = stacked_parts(saelens_cfg(atlas))
    if not parts:
        return [Path(shutil.copyfile(atlas.dictionary_dir / name, out / name))
                for name in (M.DICTIONARY_CFG, M.DICTIONARY_WEIGHTS)]
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415 (only this format reads tensors)

    tensors = load_file(atlas.dictionary_dir / M.DICTIONARY_WEIGHTS)
    written = []
    for i, (ids, own) in enumerate(parts):
        # SAE.stack's layout: each tensor its dictionaries' own side by side (W_enc by column), and
        # each dictionary's b_dec a row of part_b_dec.
        part = {name: t[:, ids.start : ids.stop] if name == "W_enc" else t[ids.start : ids.stop]
                for name, t in tensors.items() if name not in ("b_dec", "part_b_dec")}
        part["b_dec"] = tensors["part_b_dec"][i]
        folder = out / dictionary_id(atlas.manifest["hook"].get("layer"), len(ids))
        folder.mkdir(exist_ok=True)
        save_file({name: t.copy(order="C") for name, t in part.items()}, folder / M.DICTIONARY_WEIGHTS)
        (folder / M.DICTIONARY_CFG).write_text(json.dumps(own, indent=2))
        written += [folder / M.DICTIONARY_CFG, folder / M.DICTIONARY_WEIGHTS]
    return written


def _write(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> Path:
    """One Parquet file from a stream of batches, under a temporary name until whole; an empty
    table still gets its columns."""
    tmp = path.with_suffix(".parquet.tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _lance_batches(table) -> Iterator[pa.RecordBatch]:
    """Every row of a LanceDB table in row order, ``BATCH_ROWS`` at a time."""
    n = table.count_rows()
    for start in range(0, n, BATCH_ROWS):
        yield from table.take_offsets(list(range(start, min(n, start + BATCH_ROWS)))).to_arrow().to_batches()
