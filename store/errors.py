"""The one family of errors that are the user's to fix.

Everything else is ours: a damaged atlas, a bug, a full disk. The CLI prints a ``UserError`` and
exits with 2, the API answers it with its ``status``; any other exception is a logged 500 (or a
traceback on the command line), so a bug never passes for a bad request. ``where`` names what to
change: a flag (``--d-sae``), a TOML key (``train.d_sae``), a query parameter (``k``).

Lives in ``store`` because it is the lowest layer: ``ingest`` and ``api`` both import it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input. The message is safe to show and says what to change."""

    status = 400
    kind = "bad request"

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class BadParameter(UserError):
    """A request or command parameter out of range or of the wrong kind."""

    kind = "bad parameter"


class BadConfig(UserError):
    """An ingest setting (flag, TOML key or profile) that cannot work."""

    kind = "bad config"


class NotFound(UserError):
    """An id, a file or an atlas that does not exist."""

    status = 404
    kind = "not found"


class QueryRefused(UserError):
    """SQL that is refused (not read-only, several statements) or fails as written."""

    kind = "query refused"

    def __init__(self, message: str):
        super().__init__("sql", message)


class DamagedAtlas(UserError):
    """A file of an atlas that is missing, unreadable or from a newer version. Not the requester's
    doing, but the operator's to fix: the message names the file and what to do."""

    status = 500
    kind = "damaged atlas"

    def __init__(self, path: object, message: str):
        super().__init__(str(path), message)
