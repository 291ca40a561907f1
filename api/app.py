"""The HTTP API: thin Litestar routes over ``AtlasService`` (queries) and ``store.sql`` (SQL).

Errors are JSON ``{"error": ..., "detail": ...}``: a ``UserError`` (store/errors.py) is a 4xx, anything
else a 500 with a ``request_id`` that the log line carries too. No input yields a 500.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featureatlas.ingest.runtime import configure
from featureatlas.ingest.steer import Edit
from featureatlas.store.atlas import SORTABLE, Atlas, QueryInterrupted
from featureatlas.store.errors import UserError
from featureatlas.store.search import SEARCH_MODES
from featureatlas.store.sql import execute_sql
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, JSONBody, Parameter
from litestar.static_files import create_static_files_router

from .model_pool import ModelPool, PoolFull
from .service import MAX_K, AtlasService

log = logging.getLogger(__name__)
MAX_PAGE = 1000
MAX_OFFSET = 2**31 - 1  # DuckDB's OFFSET is a BIGINT; past any atlas's size anyway
REQUEST_ID_HEADER = "X-Request-ID"
RETRY_AFTER_S = 5
# The browser UI: plain files, served by this app so it works offline (no CDN, no build step).
WEB = Path(__file__).with_name("web")
Service = NamedDependency[AtlasService]
Pool = NamedDependency[ModelPool]


def _error(status: int, error: str, detail: Any = None, *, request_id: str | None = None) -> Response:
    body: dict[str, Any] = {"error": error, "detail": detail}
    headers = {}
    if request_id is not None:
        body["request_id"] = request_id
        headers[REQUEST_ID_HEADER] = request_id
    return Response(body, status_code=status, headers=headers)


def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code >= 500:
        return _internal(request, exc)
    detail = exc.extra if isinstance(exc, ValidationException) and exc.extra else exc.detail
    return _error(exc.status_code, exc.detail, detail)


def _user_error(_: Request, exc: UserError) -> Response:
    """The user's mistake: a 4xx that says what to change, and nothing logged above INFO."""
    return _error(exc.status, f"{exc.kind}: {exc.where}", str(exc))


def _busy(_: Request, exc: QueryInterrupted | PoolFull) -> Response:
    """An internal query past its time limit (``Atlas.query``), or a model pool with no free slot:
    the server is too busy for this now, and says when to ask again."""
    error = "model busy" if isinstance(exc, PoolFull) else "query too slow"
    response = _error(503, error, str(exc))
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _internal(request: Request, exc: Exception) -> Response:
    """Anything else is ours: logged with a request id that the body and a header carry, so a
    user's report can be matched to the traceback. The message itself is never shown."""
    request_id = uuid.uuid4().hex[:16]
    log.error("internal error %s on %s %s", request_id, request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error", "the server failed; the log has the details under this request id",
                  request_id=request_id)


@get("/healthz", sync_to_thread=False)
def healthz(service: Service) -> dict[str, Any]:
    return {"status": "ok", "atlas": str(service.atlas.root), "features": service.atlas.d_sae}


@get("/api/atlas", sync_to_thread=False)
def atlas_summary(service: Service) -> dict[str, Any]:
    m = service.atlas.manifest
    return {k: m.get(k) for k in ("model", "hook", "dictionary", "metrics", "corpus", "tokens", "labels", "created_at")}


@get("/api/map", sync_to_thread=True)
def feature_map(service: Service) -> Response:
    """Every feature's map position, density, label and label cluster, as parallel arrays."""
    return Response(service.feature_map(), media_type=MediaType.JSON)


def _page() -> Response:
    # One document for every page: the script reads the path and draws the view.
    return Response((WEB / "index.html").read_bytes(), media_type=MediaType.HTML)


@get(["/", "/search", "/probe", "/map", "/steer"], sync_to_thread=False, include_in_schema=False)
def page() -> Response:
    return _page()


@get("/features/{feature_id:int}", sync_to_thread=False, include_in_schema=False)
def feature_page(feature_id: FromPath[int]) -> Response:
    return _page()


@get("/api/features", sync_to_thread=True)
def list_features(
    service: Service,
    sort: str = Parameter(default="density", description=f"one of {', '.join(SORTABLE)}"),
    order: str = Parameter(default="desc", pattern="^(asc|desc)$"),
    limit: int = Parameter(default=50, ge=1, le=MAX_PAGE),
    offset: int = Parameter(default=0, ge=0, le=MAX_OFFSET),
) -> dict[str, Any]:
    rows = service.atlas.list_features(sort=sort, descending=order == "desc", limit=limit, offset=offset)
    return {"features": rows, "limit": limit, "offset": offset, "total": service.atlas.d_sae}


@get("/api/features/{feature_id:int}", sync_to_thread=True)
def feature_detail(service: Service, feature_id: FromPath[int]) -> dict[str, Any]:
    return service.feature(feature_id)


@get("/api/features/{feature_id:int}/neighbors", sync_to_thread=True)
def neighbors(
    service: Service,
    feature_id: FromPath[int],
    k: int = Parameter(default=10, ge=1, le=MAX_K),
    by: str = Parameter(default="decoder", pattern="^(decoder|coactivation)$"),
) -> dict[str, Any]:
    return service.neighbors(feature_id, k, by)


@get("/api/search", sync_to_thread=True)
def search(
    service: Service,
    q: str = Parameter(min_length=1, max_length=1000),
    k: int = Parameter(default=10, ge=1, le=MAX_K),
    mode: str | None = Parameter(default=None, description=f"restrict to one signal: {', '.join(SEARCH_MODES)}"),
) -> dict[str, Any]:
    return service.search(q, k, mode)


@dataclass
class ContrastRequest:
    positive: list[str]
    negative: list[str] = field(default_factory=list)
    k: int = 10


@post("/api/search/contrast", status_code=200)
async def contrast(service: Service, pool: Pool, data: JSONBody[ContrastRequest]) -> dict[str, Any]:
    return await pool.run(service.contrast, data.positive, data.negative, data.k)


@dataclass
class ActivationsRequest:
    text: str
    k: int = 5


@post("/api/activations", status_code=200)
async def activations(service: Service, pool: Pool, data: JSONBody[ActivationsRequest]) -> dict[str, Any]:
    return await pool.run(service.activations, data.text, data.k)


@dataclass
class SteerFeature:
    id: int
    value: float  # times the feature's maximum activation over the corpus; 0 switches it off
    mode: str = "clamp"  # clamp (set the activation) or add (push along the decoder direction)


@dataclass
class SteerRequest:
    prompt: str
    features: list[SteerFeature]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 is greedy
    seed: int = 0
    chat: bool = False  # wrap the prompt in the model's chat template
    generated_only: bool = False  # steer only the generated tokens, not the prompt's


@post("/api/steer", status_code=200)
async def steer(service: Service, pool: Pool, data: JSONBody[SteerRequest]) -> dict[str, Any]:
    """The prompt continued twice, untouched and steered, with the same seed; 503 when the model is busy."""
    edits = [Edit(f.id, f.value, f.mode) for f in data.features]
    return await pool.run(service.steer, data.prompt, edits, max_new_tokens=data.max_new_tokens,
                          temperature=data.temperature, seed=data.seed, chat=data.chat, generated_only=data.generated_only)


@dataclass
class SQLRequest:
    sql: str
    params: list[Any] | dict[str, Any] | None = None


@post("/api/sql", sync_to_thread=True, status_code=200)
def sql(service: Service, data: JSONBody[SQLRequest]) -> dict[str, Any]:
    """Read-only SQL over documents, tokens, activations and features, row and time limited."""
    return execute_sql(service.atlas, data.sql, data.params).to_dict()


def create_app(atlas: Atlas, *, probe_device: str | None = None, pool: ModelPool | None = None) -> Litestar:
    """``pool``: where model work runs (default: ``ModelPool()``)."""
    configure()
    service = AtlasService(atlas, probe_device=probe_device)
    pool = pool or ModelPool()
    return Litestar(
        # The first query otherwise pays for loading the embedder and the tables (~1-4 s).
        on_startup=[service.warm_up],
        on_shutdown=[pool.shutdown],
        route_handlers=[healthz, atlas_summary, list_features, feature_detail, neighbors, feature_map, search, contrast,
                        activations, steer, sql, page, feature_page,
                        create_static_files_router("/static", directories=[WEB], include_in_schema=False)],
        dependencies={"service": Provide(lambda: service, use_cache=True, sync_to_thread=False),
                      "pool": Provide(lambda: pool, use_cache=True, sync_to_thread=False)},
        exception_handlers={HTTPException: _http_error, UserError: _user_error, QueryInterrupted: _busy,
                            PoolFull: _busy, Exception: _internal},
        openapi_config=OpenAPIConfig(title="Feature Atlas", version="0.1.0", path="/schema"),
    )
