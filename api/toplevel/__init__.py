"""Feature Atlas: a feature database and semantic search over a sparse dictionary of a language model.

From Python::

    import featureatlas as fa

    atlas = fa.open("atlas")
    atlas.search("kings and queens")          # features about a concept, best first
    atlas.feature(812)                        # label, scores, statistics, top examples
    atlas.sql("select * from features order by density desc limit 5").to_pandas()

``fa.open`` returns an ``OpenAtlas`` (``api/library.py``); the command line is ``featureatlas``
(``api/cli.py``) and the HTTP API ``featureatlas serve`` (``api/app.py``). They share one service.

This file is the top of the package (pyproject maps it here). It imports nothing until asked:
every ``featureatlas.*`` import runs it first, the SQL worker processes included, which must stay
light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# ``open`` is public but left out of ``__all__``: ``from featureatlas import *`` must not shadow the builtin.
__all__ = ["OpenAtlas", "Result"]
_PUBLIC = ("open", *__all__)

if TYPE_CHECKING:
    from featureatlas.api.library import OpenAtlas, Result, open  # noqa: F401 (for type checkers)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from featureatlas.api import library

        return getattr(library, name)
    raise AttributeError(f"module 'featureatlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
