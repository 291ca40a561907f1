"""The HTTP API: thin Litestar routes that read an atlas through ``featureatlas.store``.

Errors are JSON ``{"error": ..., "detail": ...}`` with a 4xx status; no input yields a 500.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, Parameter

from featureatlas.store.atlas import SORTABLE, Atlas

MAX_PAGE = 1000


def _error(status: int, error: str, detail: Any = None) -> Response:
    return Response({"error": error, "detail": detail}, status_code=status)


def _http_error(_: Request, exc: HTTPException) -> Response:
    detail = exc.extra if isinstance(exc, ValidationException) and exc.extra else exc.detail
    return _error(exc.status_code, exc.detail if exc.status_code != 500 else "internal error", detail)


def _bad_value(_: Request, exc: ValueError) -> Response:
    return _error(400, "bad request", str(exc))


@get("/healthz", sync_to_thread=False)
def healthz(atlas: NamedDependency[Atlas]) -> dict[str, Any]:
    return {"status": "ok", "atlas": str(atlas.root), "features": atlas.d_sae}


@get("/api/atlas", sync_to_thread=False)
def atlas_summary(atlas: NamedDependency[Atlas]) -> dict[str, Any]:
    m = atlas.manifest
    return {k: m.get(k) for k in ("model", "hook", "dictionary", "metrics", "corpus", "tokens", "created_at")}


@get("/api/features", sync_to_thread=True)
def list_features(
    atlas: NamedDependency[Atlas],
    sort: str = Parameter(default="density", description=f"one of {', '.join(SORTABLE)}"),
    order: str = Parameter(default="desc", pattern="^(asc|desc)$"),
    limit: int = Parameter(default=50, ge=1, le=MAX_PAGE),
    offset: int = Parameter(default=0, ge=0),
) -> dict[str, Any]:
    rows = atlas.list_features(sort=sort, descending=order == "desc", limit=limit, offset=offset)
    return {"features": rows, "limit": limit, "offset": offset, "total": atlas.d_sae}


@get("/api/features/{feature_id:int}", sync_to_thread=True)
def feature_detail(atlas: NamedDependency[Atlas], feature_id: FromPath[int]) -> dict[str, Any]:
    if not 0 <= feature_id < atlas.d_sae:
        raise NotFoundException(f"no feature {feature_id}: this atlas has features 0..{atlas.d_sae - 1}")
    row = atlas.feature(feature_id)
    if row is None:
        raise NotFoundException(f"no feature {feature_id}")
    examples = atlas.feature_examples(feature_id)
    row["top_examples"] = [e for e in examples if e["kind"] == "top"]
    row["quantile_examples"] = [e for e in examples if e["kind"] != "top"]
    bins = len(row["histogram"])
    row["histogram_edges"] = [row["max_activation"] * i / bins for i in range(bins + 1)]
    return row


def create_app(atlas: NamedDependency[Atlas]) -> Litestar:
    return Litestar(
        route_handlers=[healthz, atlas_summary, list_features, feature_detail],
        dependencies={"atlas": Provide(lambda: atlas, use_cache=True, sync_to_thread=False)},
        exception_handlers={HTTPException: _http_error, ValueError: _bad_value},
        openapi_config=OpenAPIConfig(title="Feature Atlas", version="0.1.0", path="/schema"),
    )
