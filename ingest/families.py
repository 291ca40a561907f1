"""Feature families across the widths of the dictionaries at one hook point.

When a dictionary widens, a feature splits into finer ones (Scaling Monosemanticity's "feature
splitting"). The widths are either dictionaries trained apart and stacked (``SAE.stack``), or the
prefixes of a nested (matryoshka) one, each trained to reconstruct on its own, whose wider prefixes
add latents to the narrower ones'. Every latent of a wider dictionary (that a narrower one does not
hold too) is linked to its *parent*, the latent of the next narrower dictionary whose decoder
direction is closest, and the link is checked on the corpus: the share of the child's tokens on
which the parent fires too. The stage also measures the splitting: how many added latents have a parent clearly above
chance, how many children a parent has, and how much of a parent's top examples its children cover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from featureatlas.store.schema import FAMILIES

FAMILIES_VERSION = 1
OUTPUTS = ("families.parquet",)
BLOCK_CELLS = 2**24  # child x parent cosines computed at once (64 MB of float32)
# A parent "clearly above chance": the largest cosine of a random direction with n others in d
# dimensions is about sqrt(2 ln n / d) (0.17 for 4,096 in 576); this is the multiple of it a link
# needs to count as a split in the summary (every child is linked; the table keeps the cosine).
CHANCE_MULTIPLE = 2.0


def chance_cosine(n: int, d: int) -> float:
    """The typical largest |cosine| of a random unit vector with ``n`` random others in ``d`` dimensions."""
    return math.sqrt(2 * math.log(max(n, 2)) / d)


def link(decoder: np.ndarray, parts: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """``decoder`` [d_sae, d_in], unit rows; ``parts`` each dictionary's (first latent, width),
    narrowest first. For every latent of a dictionary that the one before does not hold: its parent
    in the one before, the decoder cosine, and both dictionaries' widths."""
    child, parent, cosine, child_width, parent_width = [], [], [], [], []
    for (first_narrow, narrow), (first_wide, wide) in zip(parts, parts[1:]):
        parents = np.arange(first_narrow, first_narrow + narrow)
        # A nested prefix holds the narrower one's latents (both start at 0): only those it adds are children.
        start_at = first_narrow + narrow if first_wide == first_narrow else first_wide
        block = max(1, BLOCK_CELLS // narrow)
        for start in range(start_at, first_wide + wide, block):
            stop = min(first_wide + wide, start + block)
            sims = decoder[start:stop] @ decoder[parents].T
            best = sims.argmax(1)
            child.append(np.arange(start, stop))
            parent.append(parents[best])
            cosine.append(sims[np.arange(stop - start), best])
            child_width.append(np.full(stop - start, wide))
            parent_width.append(np.full(stop - start, narrow))
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return {"feature_id": cat(child, np.int32), "parent_id": cat(parent, np.int32), "decoder_cosine": cat(cosine, np.float32),
            "width": cat(child_width, np.int32), "parent_width": cat(parent_width, np.int32)}


def narrowest(parts: Sequence[tuple[int, int]], ids: np.ndarray) -> np.ndarray:
    """The width of the narrowest of ``parts`` holding each latent of ``ids`` (a parent found among
    a nested dictionary's 4,096 may be one of its first 1,024)."""
    out = np.zeros(len(ids), np.int64)
    for first, width in sorted(parts, key=lambda p: -p[1]):  # narrower ones overwrite
        out[(ids >= first) & (ids < first + width)] = width
    return out


def run(decoder: np.ndarray, parts: Sequence[tuple[int, int]], ids: dict[int, str], encode_folder: Path,
        folder: Path) -> dict[str, Any]:
    """Writes ``families.parquet`` (``store.schema.FAMILIES``) and returns the splitting measures.
    ``ids``: each width's dictionary id; ``encode_folder`` holds the encode stage's activations and
    examples."""
    links = link(decoder, parts)
    if not len(links["feature_id"]):  # one width: no families, and nothing to measure
        pq.write_table(FAMILIES.arrow().empty_table(), folder / OUTPUTS[0])
        return {"links": 0}
    con = duckdb.connect()
    try:
        con.register("links", pa.table(links))
        acts, examples = (str(encode_folder / name) for name in ("activations.parquet", "examples.parquet"))
        # Of each child's tokens, the share where its parent fires too (0 for a child that never fired).
        together = dict(con.execute(
            """
            with child as (select a.doc_id, a.position, l.feature_id, l.parent_id
                           from read_parquet($acts) a join links l using (feature_id)),
                 n as (select feature_id, count(*) as n from child group by 1),
                 shared as (select c.feature_id, count(*) as n from child c join read_parquet($acts) p
                            on p.doc_id = c.doc_id and p.position = c.position and p.feature_id = c.parent_id group by 1)
            select n.feature_id, coalesce(shared.n, 0) / n.n from n left join shared using (feature_id)
            """, {"acts": acts}).fetchall())
        # Of each parent's top examples (their strongest token), the share on which one of its children fires.
        covered = con.execute(
            """
            with tops as (select feature_id as parent_id, doc_id, max_position as position
                          from read_parquet($examples) where kind = 'top' and feature_id in (select parent_id from links)),
                 hit as (select distinct t.parent_id, t.doc_id, t.position from tops t
                         join links l using (parent_id)
                         join read_parquet($acts) a on a.feature_id = l.feature_id and a.doc_id = t.doc_id
                                                       and a.position = t.position)
            select avg(coalesce(h.n, 0) / t.n) from (select parent_id, count(*) as n from tops group by 1) t
            left join (select parent_id, count(*) as n from hit group by 1) h using (parent_id)
            """, {"examples": examples, "acts": acts}).fetchone()[0]
    finally:
        con.close()
    coact = np.array([together.get(int(f), 0.0) for f in links["feature_id"]], np.float32)
    home = narrowest(parts, links["parent_id"])  # as the API names it
    table = FAMILIES.build({
        "dictionary": [ids[int(w)] for w in links["width"]], "feature_id": links["feature_id"],
        "parent_dictionary": [ids[int(w)] for w in home], "parent_id": links["parent_id"],
        "decoder_cosine": links["decoder_cosine"], "coactivation": coact,
    })
    pq.write_table(table, folder / OUTPUTS[0])
    return _measures(links, coact, covered, decoder.shape[1])


def _measures(links: dict[str, np.ndarray], coact: np.ndarray, covered: float | None, d_in: int) -> dict[str, Any]:
    """How the dictionary splits, per pair of widths: links, share above chance, children per parent."""
    out: dict[str, Any] = {"links": int(len(links["feature_id"])), "chance_multiple": CHANCE_MULTIPLE,
                           "parents_top_examples_covered_by_children": None if covered is None else float(covered)}
    pairs = []
    for narrow in np.unique(links["parent_width"]):
        rows = links["parent_width"] == narrow
        floor = CHANCE_MULTIPLE * chance_cosine(int(narrow), d_in)
        clear = rows & (links["decoder_cosine"] >= floor)
        children = np.bincount(links["parent_id"][clear], minlength=int(narrow))
        parents = children[children > 0]
        pairs.append({
            "narrow": int(narrow), "wide": int(links["width"][rows][0]), "added": int(rows.sum()),
            "cosine_floor": round(floor, 4), "share_above_floor": float(clear.sum() / max(rows.sum(), 1)),
            "median_cosine": float(np.median(links["decoder_cosine"][rows])) if rows.any() else None,
            "parents_with_children": int(len(parents)),
            "children_per_parent_mean": float(parents.mean()) if len(parents) else None,
            "children_per_parent_max": int(parents.max()) if len(parents) else None,
            "median_coactivation": float(np.median(coact[clear])) if clear.any() else None,
        })
    out["pairs"] = pairs
    return out
