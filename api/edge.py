"""What every answer of the server promises, routed or not: security headers, ``HEAD`` wherever
``GET`` works, and a token in front of the API when one is set (``featureatlas serve`` requires one
beyond loopback).

This is the ASGI entry itself (``AtlasApp.__call__``), not a middleware: Litestar runs middleware
after routing, so its own 404s and 405s would go out without the headers, and the token must hold
for paths no route matches too. The app stays a ``Litestar``, so its test client works unchanged.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import msgspec
from featureatlas.store.errors import BadParameter
from litestar import Litestar
from litestar.types import Message, Receive, Scope, Send
from litestar.utils import normalize_path

# The UI is plain files from this server, with no inline script or style and nothing from another
# origin. ``style-src 'self'`` refuses style attributes in markup but not ``element.style`` (CSSOM),
# which is how the UI shades tokens.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # a page's URL (a search, a ?token=) never leaves in a Referer
    "x-frame-options": "DENY",  # frame-ancestors, for browsers that predate it
}
TOKEN_ENV = "FEATUREATLAS_TOKEN"
COOKIE = "featureatlas_token"
# Everything under these needs the token; /healthz, the pages and /static stay open (they hold no data).
GUARDED = ("/api", "/schema")
# URL-unreserved characters: a token goes into a URL (?token=), a header and a cookie unescaped.
# 16 of them at least: the token is all that stands between the network and the SQL route.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,}")
TOKEN_REFUSED = ("a token is required: send the header `Authorization: Bearer TOKEN`; in a browser, open the UI "
                 "once as /?token=TOKEN")
_HEADERS = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server to this machine. A name other than localhost
    could resolve to anything, so it counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> None:
    if not TOKEN_PATTERN.fullmatch(token):
        raise BadParameter(f"--token / {TOKEN_ENV}", "use at least 16 of the characters A-Z a-z 0-9 . _ ~ -, e.g. "
                           "from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")


class AtlasApp(Litestar):
    """``Litestar`` plus the promises above. ``token``: required by every route under ``GUARDED``,
    as ``Authorization: Bearer TOKEN`` or the cookie a visit to ``/?token=TOKEN`` sets for the UI."""

    def __init__(self, *args: Any, token: str | None = None, **kwargs: Any) -> None:
        if token is not None:
            check_token(token)
        super().__init__(*args, **kwargs)
        self.token = token

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:  # answered as GET (same status and headers, content-length included), without the body
            scope = {**scope, "method": "GET"}
        # The router matches the path without the root path and with slashes merged (//api/sql is
        # /api/sql): the guard must see the same string, or a doubled slash would pass it.
        root = scope.get("root_path") or ""
        path = scope["path"].removeprefix(root) if root and scope["path"].startswith(root) else scope["path"]
        scope = {**scope, "path": root + normalize_path(path)}
        guarded_path = normalize_path(path)
        send = _edge_send(send, head=head)
        if self.token is not None and not await self._admitted(scope, guarded_path, send):
            return
        await super().__call__(scope, receive, send)

    async def _admitted(self, scope: Scope, path: str, send: Send) -> bool:
        """Whether the request goes on; if not, its answer (401, or the redirect that sets the cookie) is sent.
        ``path``: the path as the router matches it."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        offered = [v for k, v in query if k == "token"]
        if any(path == p or path.startswith(p + "/") for p in GUARDED):
            if self._valid(_bearer(scope)):
                return True
            if self._valid(_cookie(scope)):
                # A page on another port of this host is the same site, so SameSite lets the cookie
                # go with its form posts; a JSON body needs a CORS preflight, which this server
                # never grants. The UI sends JSON.
                if scope["method"] in ("GET", "HEAD") or _json(scope):
                    return True
                await _send_json(send, 415, {"error": "JSON required",
                                             "detail": "with the cookie, send bodies as Content-Type: application/json"}, [])
                return False
            await _send_json(send, 401, {"error": "token required", "detail": TOKEN_REFUSED},
                             [(b"www-authenticate", b'Bearer realm="featureatlas"')])
            return False
        if not offered:
            return True
        if not self._valid(offered[0]):
            await _send_json(send, 401, {"error": "wrong token", "detail": "the token in the URL is not this server's"},
                             [(b"www-authenticate", b'Bearer realm="featureatlas"')])
            return False
        # The page again without the token (kept out of the history and bookmarks); the UI's own
        # requests carry the cookie, which no other site's page can make the browser send.
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        here = ("/" + quote(path.lstrip("/"))).encode()  # never //host: that would be another site
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", here + (b"?" + rest.encode() if rest else b"")),
            (b"set-cookie", f"{COOKIE}={offered[0]}; Path=/; HttpOnly; SameSite=Strict{secure}".encode()),
            (b"cache-control", b"no-store"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return False

    def _valid(self, offered: str | None) -> bool:
        assert self.token is not None
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def _header(scope: Scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name), None)


def _bearer(scope: Scope) -> str | None:
    scheme, _, value = (_header(scope, b"authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _json(scope: Scope) -> bool:
    return (_header(scope, b"content-type") or "").split(";")[0].strip().lower() == "application/json"


def _cookie(scope: Scope) -> str | None:
    for part in (_header(scope, b"cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def _edge_send(send: Send, *, head: bool) -> Send:
    async def edge_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            present = {k.lower() for k, _ in headers}
            headers += [(k, v) for k, v in _HEADERS if k not in present]
            # What a 405 or an OPTIONS says is allowed includes HEAD wherever GET is.
            headers = [(k, v + b", HEAD" if k.lower() == b"allow" and b"GET" in v and b"HEAD" not in v else v)
                       for k, v in headers]
            message = {**message, "headers": headers}  # type: ignore[typeddict-item]
        elif head and message["type"] == "http.response.body":
            message = {**message, "body": b""}  # type: ignore[typeddict-item]
        await send(message)

    return edge_send


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = msgspec.json.encode(body)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})
