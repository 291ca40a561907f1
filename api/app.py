"""The HTTP API: thin Litestar routes over ``AtlasService`` (queries) and ``store.sql`` (SQL).

Errors are JSON ``{"error": ..., "detail": ...}``: a ``UserError`` (store/errors.py) is a 4xx, anything
else a 500 with a ``request_id`` that the log line carries too. No input yields a 500. Every limit the
server enforces on a request is declared on its parameters or body types, so the decoder enforces it
before any work and the OpenAPI schema states it; what a schema cannot say (a text's length in
tokens, a feature that never fired) is the service's 400. ``edge.AtlasApp`` adds what holds for
every response: security headers, HEAD, the token.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from featureatlas.ingest.probe import MAX_NEW_TOKENS, MAX_TEMPERATURE
from featureatlas.ingest.runtime import configure
from featureatlas.ingest.steer import MAX_VALUE, MODES, Edit
from featureatlas.store.atlas import SORTABLE, Atlas, QueryInterrupted
from featureatlas.store.errors import UserError
from featureatlas.store.search import FUSED, SEARCH_MODES
from featureatlas.store.sql import MAX_SQL_CHARS, execute_sql
from featureatlas.store.sql_worker import WORKERS as SQL_WORKERS
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, Example, SecurityScheme
from litestar.params import FromPath, JSONBody, KwargDefinition, Parameter
from litestar.static_files import create_static_files_router
from litestar.types import Empty

from .edge import AtlasApp
from .live import LiveService, RemoteFollower
from .service import MAX_K, MAX_OFFSET, MAX_PAGE, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_QUERY_CHARS, MAX_STEERED, AtlasService
from .work_pool import PoolFull, WorkPool

log = logging.getLogger(__name__)
# The largest integer a JSON number carries exactly to every client (JavaScript's MAX_SAFE_INTEGER),
# and that the schema can state exactly (it writes limits as floats): the steer seed's limit.
MAX_JSON_INT = 2**53 - 1
REQUEST_ID_HEADER = "X-Request-ID"
MAP_VERSION_HEADER = "X-Atlas-Version"  # on each map level: the ``version`` of the head it belongs to
RETRY_AFTER_S = 5
SEARCH_WAITING = 63
HEAVY_THREADS = max(1, (os.cpu_count() or 2) - 1)
SQL_WAITING = 30
# Request bodies past these sizes are refused (413) before they are read. Each fits its route's
# largest valid body even with every character sent as a JSON \uXXXX escape (6 bytes), which is how
# Python's json.dumps sends non-ASCII text.
MAX_BODY = 64 * 1024  # activations and steer: one 4,000-character text (24 KB escaped)
JSON_CHAR_BYTES = 6
# A string the service would refuse as empty: at least one character that is not whitespace.
NOT_BLANK = r"\S"
DICTIONARY_FILTER = ("only this dictionary's features (an id of /api/dictionaries, e.g. L15-4k: 404 if it has none "
                     "such); default every one")
# The browser UI: plain files, served by this app so it works offline (no CDN, no build step).
WEB = Path(__file__).with_name("web")
Service = NamedDependency[AtlasService]
Pool = NamedDependency[WorkPool]
Searches = NamedDependency[WorkPool]
Statements = NamedDependency[WorkPool]


def _body_limit(chars: int) -> int:
    """A body limit that fits ``chars`` characters of text, escaped, plus the JSON around them."""
    return max(MAX_BODY, JSON_CHAR_BYTES * chars + 16 * 1024)


def _text(max_chars: int, example: str) -> Any:
    """A non-blank string of at most ``max_chars``. msgspec enforces its ``Meta`` when the body is
    decoded; Litestar's schema reads the ``KwargDefinition`` (it ignores ``Meta`` on list items)."""
    limits: dict[str, Any] = {"min_length": 1, "max_length": max_chars, "pattern": NOT_BLANK}
    return Annotated[str, msgspec.Meta(**limits, examples=[example]), KwargDefinition(**limits)]


# -- errors ---------------------------------------------------------------------------------------


class FieldError(msgspec.Struct):
    """One value the schema refuses."""

    message: str
    key: str | None = None  # a query parameter, or a path into the body such as features[0].value
    source: str | None = None  # query, path, body, header or cookie


class ErrorBody(msgspec.Struct):
    """Every error the API answers."""

    error: str  # what went wrong, naming the parameter when one is at fault ("bad parameter: k")
    detail: str | list[FieldError]  # what to change; the refused values when the schema refuses some
    request_id: str | None = None  # 500s only: the log entry that holds the traceback (also the X-Request-ID header)


_ERRORS = {
    400: "A parameter is out of range or of the wrong kind; `error` names it. Values the schema refuses are listed "
         "in `detail`; what the schema cannot say (a text over the model's token limit, a feature that never fired, "
         "SQL that is not one read-only statement) is refused with a sentence there.",
    401: "The server was started with a token and the request did not carry it: send `Authorization: Bearer TOKEN`.",
    404: "No such feature (ids run from 0 to the atlas's feature count - 1), or no feature map in this atlas.",
    413: "The request body is over this route's size limit; nothing of it was read past the limit.",
    500: "The server failed. The log holds the traceback under `request_id`.",
    503: "Too busy: the model or search pool is full, no SQL worker came free, or an internal query ran past "
         "its time limit. Ask again after `Retry-After` seconds.",
}


def _errors(*statuses: int, guarded: bool = True) -> dict[int, ResponseSpec]:
    """A route's error answers: those it names, plus 500, and 401 for a route the token guards."""
    return {s: ResponseSpec(ErrorBody, description=_ERRORS[s], generate_examples=False)
            for s in sorted({*statuses, 500, *([401] if guarded else [])})}


def _error(status: int, error: str, detail: Any = None, *, request_id: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"error": error, "detail": detail}
    headers = dict(headers or {})
    if request_id is not None:
        body["request_id"] = request_id
        headers[REQUEST_ID_HEADER] = request_id
    return Response(body, status_code=status, headers=headers)


def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code >= 500:
        return _internal(request, exc)
    headers = dict(exc.headers or {})  # a 405's Allow
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        # Litestar names the body "data" (its parameter's name) when there is none
        extra = [{**e, "key": "body", "message": "a JSON body is required"} if e.get("key") == "data" else e
                 for e in exc.extra if isinstance(e, dict)]
        keys = [e["key"] for e in extra if e.get("key")]
        return _error(exc.status_code, f"bad parameter: {', '.join(keys)}" if keys else exc.detail, extra, headers=headers)
    if exc.status_code == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        return _error(413, "request body too large", f"this route takes bodies of at most {limit:,} bytes",
                      headers=headers)
    return _error(exc.status_code, exc.detail, exc.detail, headers=headers)


def _user_error(request: Request, exc: UserError) -> Response:
    """The user's mistake: a 4xx that says what to change, and nothing logged above INFO. A damaged
    atlas is the operator's (a 500, ``DamagedAtlas``): logged with a request id, its message shown."""
    if exc.status < 500:
        return _error(exc.status, f"{exc.kind}: {exc.where}", str(exc))
    request_id = uuid.uuid4().hex[:16]
    log.error("%s %s on %s %s: %s", exc.kind, request_id, request.method, request.url.path, exc)
    return _error(exc.status, exc.kind, exc.message, request_id=request_id)


def _busy(_: Request, exc: QueryInterrupted | PoolFull) -> Response:
    """An internal query past its time limit (``Atlas.query``), no free SQL worker, or a full work
    pool: the server is too busy for this now, and says when to ask again."""
    error = f"{exc.what.removeprefix('the ')} busy" if isinstance(exc, PoolFull) else "query too slow"
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


class StrictBodyRequest(Request):
    """A JSON body decoded strictly into its route's ``msgspec.Struct``: Litestar converts bodies
    leniently (``"k": "5"`` as 5, ``"chat": 0`` as false), so the server would accept bodies its
    schema calls invalid. What this decodes, Litestar's conversion passes through unchanged."""

    async def json(self) -> Any:
        field = self.route_handler.parsed_data_field
        if self._json is Empty and field is not None and field.is_subclass_of(msgspec.Struct):
            try:
                body = msgspec.json.decode(await self.body())
                self._json = msgspec.convert(_integral(body, msgspec.inspect.type_info(field.annotation)),
                                             field.annotation, strict=True)
            except msgspec.ValidationError as e:  # "Expected `int`, got `str` - at `$.features[0].id`"
                message, _, where = str(e).partition(" - at ")
                key = where.strip("`").removeprefix("$").removeprefix(".") or "body"
                raise ValidationException("invalid body", extra=[{"message": message, "key": key, "source": "body"}]) from None
            except msgspec.DecodeError as e:
                raise ValidationException("invalid body", extra=[{"message": str(e), "key": "body", "source": "body"}]) from None
        return await super().json()


def _integral(value: Any, kind: msgspec.inspect.Type) -> Any:
    """``value`` with a whole float (``2.0``) as an int where ``kind`` wants an int: JSON Schema
    counts it as an integer, msgspec's strict conversion does not."""
    if isinstance(kind, msgspec.inspect.IntType) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(kind, msgspec.inspect.StructType) and isinstance(value, dict):
        fields = {f.encode_name: f.type for f in kind.fields}
        return {k: _integral(v, fields[k]) if k in fields else v for k, v in value.items()}
    if isinstance(kind, msgspec.inspect.ListType) and isinstance(value, list):
        return [_integral(v, kind.item_type) for v in value]
    return value


# -- routes ---------------------------------------------------------------------------------------


@get("/healthz", sync_to_thread=False, responses=_errors(guarded=False))
def healthz(service: Service) -> dict[str, Any]:
    """Liveness: status, feature count and when the atlas was published. Open even when a token guards the rest."""
    # No path: /healthz stays open when a token guards the rest, and the file system is not its business.
    return {"status": "ok", "features": service.atlas.d_sae, "created_at": service.atlas.manifest.get("created_at")}


@get("/api/atlas", sync_to_thread=False, responses=_errors())
def atlas_summary(service: Service) -> dict[str, Any]:
    """The manifest's summary: model, hook, dictionary, held-out metrics, corpus, tokens, labels."""
    return service.info()


@get("/api/dictionaries", sync_to_thread=True, responses=_errors())
def dictionaries(service: Service) -> dict[str, Any]:
    """Every dictionary of the atlas (id such as L15-4k, hook point, architecture, width, k, held-out
    metrics, training settings), the default one, which the feature routes answer for, first."""
    return service.dictionaries()


@get("/api/map", sync_to_thread=True, responses=_errors(404))
def feature_map(service: Service) -> Response:
    """Every feature's map position, density, label and label cluster, as parallel arrays."""
    return Response(service.feature_map(), media_type=MediaType.JSON)


@get("/api/map/head", sync_to_thread=True, responses=_errors(404))
def map_head(service: Service) -> dict[str, Any]:
    """The map for the browser, part one: clusters, regions, how many points each level of detail
    holds, and the atlas ``version`` that each level's ``X-Atlas-Version`` header must match."""
    return service.map_head()


@get("/api/map/points/{level:int}", sync_to_thread=True, media_type="application/octet-stream",
     responses=_errors(400, 404))
def map_points(service: Service, level: FromPath[int]) -> Response[bytes]:
    """One level of detail of the map's points: little-endian int32 feature_id, float32 x, y and
    density, int32 cluster, each column whole before the next (``store.map_view.map_levels``);
    ``X-Atlas-Version`` names the atlas they come from."""
    return Response(service.map_level(level), media_type="application/octet-stream",
                    headers={MAP_VERSION_HEADER: service.map_version})


def _page() -> Response:
    # One document for every page: the script reads the path and draws the view.
    return Response((WEB / "index.html").read_bytes(), media_type=MediaType.HTML)


@get(["/", "/search", "/probe", "/map", "/steer"], sync_to_thread=False, include_in_schema=False)
def page() -> Response:
    return _page()


@get("/features/{feature_id:int}", sync_to_thread=False, include_in_schema=False)
def feature_page(feature_id: FromPath[int]) -> Response:
    return _page()


# Enumerations declared once, where they are checked, and stated in the schema as enums.
Sortable = Literal[SORTABLE]  # type: ignore[valid-type]
SearchMode = Literal[(*SEARCH_MODES, FUSED)]  # type: ignore[valid-type]
SteerMode = Literal[MODES]  # type: ignore[valid-type]


@get("/api/features", sync_to_thread=True, responses=_errors(400, 503))
def list_features(
    service: Service,
    sort: Sortable = Parameter(default="density"),
    order: Literal["asc", "desc"] = Parameter(default="desc"),
    limit: int = Parameter(default=50, ge=1, le=MAX_PAGE),
    offset: int = Parameter(default=0, ge=0, le=MAX_OFFSET),
) -> dict[str, Any]:
    """A page of features, sorted by a statistic."""
    return service.features(sort, order == "desc", limit, offset)


@get("/api/features/{feature_id:int}", sync_to_thread=True, responses=_errors(400, 404, 503))
def feature_detail(service: Service, feature_id: FromPath[int]) -> dict[str, Any]:
    """One feature: label and scores, statistics, histogram, logit effects, top and quantile examples with
    per-token activations."""
    return service.feature(feature_id)


@get("/api/features/{feature_id:int}/neighbors", sync_to_thread=True, responses=_errors(400, 404, 503))
def neighbors(
    service: Service,
    feature_id: FromPath[int],
    k: int = Parameter(default=10, ge=1, le=MAX_K),
    by: Literal["decoder", "coactivation"] = Parameter(default="decoder"),
    dictionary: str | None = Parameter(default=None, max_length=64, description=DICTIONARY_FILTER),
) -> dict[str, Any]:
    """The nearest features to one: by decoder cosine, or those that fire on the same tokens."""
    return service.neighbors(feature_id, k, by, dictionary)


@get("/api/search", responses=_errors(400, 404, 503))
async def search(
    service: Service,
    searches: Searches,
    q: str = Parameter(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK,
                       examples=[Example(value="suspension bridges")]),
    k: int = Parameter(default=10, ge=1, le=MAX_K),
    mode: SearchMode | None = Parameter(default=None, description="one signal, or all (fused, the default)"),
    dictionary: str | None = Parameter(default=None, max_length=64, description=DICTIONARY_FILTER),
) -> dict[str, Any]:
    """Features about a concept in plain words, best first: hits with their evidence, score and the
    signals that matched, and whether the answer is ``confident``."""
    return await searches.run(service.search, q, k, mode, dictionary)


# Request bodies: msgspec Structs, whose field constraints Litestar both enforces and documents.
Prompt = _text(MAX_PROMPT_CHARS, "The Golden Gate Bridge spans the bay.")
SQLText = _text(MAX_SQL_CHARS, "select feature_id, label, density from features order by density desc limit 10")
TopK = Annotated[int, msgspec.Meta(ge=1, le=MAX_K)]
# The model routes answer 413, and 503 when the model pool is full.
MODEL_ERRORS = _errors(400, 413, 503)


class ContrastRequest(msgspec.Struct):
    positive: Annotated[list[Prompt], msgspec.Meta(min_length=1, max_length=MAX_PROMPTS)]
    negative: Annotated[list[Prompt], msgspec.Meta(max_length=MAX_PROMPTS)] = []
    k: TopK = 10


@post("/api/search/contrast", status_code=200, responses=MODEL_ERRORS,
      request_max_body_size=_body_limit(2 * MAX_PROMPTS * MAX_PROMPT_CHARS))
async def contrast(service: Service, pool: Pool, data: JSONBody[ContrastRequest]) -> dict[str, Any]:
    """Features that fire on every positive prompt and on no negative one."""
    return await pool.run(service.contrast, data.positive, data.negative, data.k)


class ActivationsRequest(msgspec.Struct):
    text: Prompt
    k: TopK = 5


@post("/api/activations", status_code=200, responses=MODEL_ERRORS, request_max_body_size=_body_limit(MAX_PROMPT_CHARS))
async def activations(service: Service, pool: Pool, data: JSONBody[ActivationsRequest]) -> dict[str, Any]:
    """Each token of a text with its top features: ``value``, and ``relative`` to the feature's corpus maximum."""
    return await pool.run(service.activations, data.text, data.k)


class SteerFeature(msgspec.Struct):
    id: Annotated[int, msgspec.Meta(ge=0)]
    # times the feature's maximum activation over the corpus; 0 switches it off
    value: Annotated[float, msgspec.Meta(ge=-MAX_VALUE, le=MAX_VALUE)]
    mode: SteerMode = "clamp"  # clamp (set the activation) or add (push along the decoder direction)


class SteerRequest(msgspec.Struct):
    prompt: Prompt
    features: Annotated[list[SteerFeature], msgspec.Meta(min_length=1, max_length=MAX_STEERED)]
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)] = 32
    temperature: Annotated[float, msgspec.Meta(ge=0, le=MAX_TEMPERATURE)] = 0.0  # 0 is greedy
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_JSON_INT)] = 0
    chat: bool = False  # wrap the prompt in the model's chat template
    generated_only: bool = False  # steer only the generated tokens, not the prompt's


@post("/api/steer", status_code=200, responses=MODEL_ERRORS, request_max_body_size=_body_limit(MAX_PROMPT_CHARS))
async def steer(service: Service, pool: Pool, data: JSONBody[SteerRequest]) -> dict[str, Any]:
    """The prompt continued twice, untouched and steered, with the same seed; 503 when the model is busy."""
    edits = [Edit(f.id, f.value, f.mode) for f in data.features]
    return await pool.run(service.steer, data.prompt, edits, max_new_tokens=data.max_new_tokens,
                          temperature=data.temperature, seed=data.seed, chat=data.chat, generated_only=data.generated_only)


class SQLRequest(msgspec.Struct):
    sql: SQLText
    params: list[Any] | dict[str, Any] | None = None


@post("/api/sql", status_code=200, responses=_errors(400, 413, 503), request_max_body_size=_body_limit(MAX_SQL_CHARS))
async def sql(service: Service, statements: Statements, data: JSONBody[SQLRequest]) -> dict[str, Any]:
    """Read-only SQL over documents, tokens, activations and features, row and time limited."""
    result = await statements.run(execute_sql, service.atlas, data.sql, data.params)
    return result.to_dict()


API = [atlas_summary, dictionaries, list_features, feature_detail, neighbors, feature_map, map_head, map_points, search,
       contrast, activations, steer, sql]


def create_app(atlas: Atlas, *, probe_device: str | None = None, pool: WorkPool | None = None,
               token: str | None = None, follow: RemoteFollower | None = None) -> Litestar:
    """``pool``: where model work runs (default: one ``WorkPool`` for the model). ``token``: required by every
    route under /api and by /schema (``edge.AtlasApp``); the schema then declares it. ``follow``: for
    an atlas served from the mirror of an object store, what keeps that mirror current."""
    configure()
    live = LiveService(atlas, probe_device=probe_device)  # follows the atlas through a rebuild (api/live.py)
    # The model and search each have threads of their own: a search never queues behind a generation
    # (seconds on a CPU; under load that queue was search's p50 of 4 s, against 87 ms without model
    # traffic), and searches run side by side, as many as the cores but one. The model runs one pass
    # at a time anyway. ``featureatlas serve`` holds torch's threads to cores - 1 too.
    pool = pool or WorkPool("the model")
    # Searches queue rather than being refused (a page of results is what a visitor came for).
    searches = WorkPool("search", workers=HEAVY_THREADS, waiting=SEARCH_WAITING)
    # SQL threads only wait on the worker processes, which bound the work themselves.
    statements = WorkPool("SQL", workers=SQL_WORKERS, waiting=SQL_WAITING)
    return AtlasApp(
        token=token,
        # The first query otherwise pays for loading the embedder and the tables (~1-4 s).
        on_startup=[live.warm_up] + ([follow.start] if follow else []),
        on_shutdown=([follow.close] if follow else []) + [pool.shutdown, searches.shutdown, statements.shutdown,
                                                           live.close],
        route_handlers=_routes(token),
        dependencies={"service": Provide(live.current, use_cache=False, sync_to_thread=False),
                      "pool": Provide(lambda: pool, use_cache=True, sync_to_thread=False),
                      "searches": Provide(lambda: searches, use_cache=True, sync_to_thread=False),
                      "statements": Provide(lambda: statements, use_cache=True, sync_to_thread=False)},
        exception_handlers={HTTPException: _http_error, UserError: _user_error, QueryInterrupted: _busy,
                            PoolFull: _busy, Exception: _internal},
        request_max_body_size=MAX_BODY,
        request_class=StrictBodyRequest,
        openapi_config=_openapi(token),
    )


def _routes(token: str | None) -> list[Any]:
    return [healthz, Router("/", route_handlers=API, security=[{"bearer": []}] if token else None), page, feature_page,
            create_static_files_router("/static", directories=[WEB], include_in_schema=False)]


def _openapi(token: str | None) -> OpenAPIConfig:
    bearer = {"bearer": SecurityScheme(type="http", scheme="bearer", description="the token the server was started with")}
    # /schema is the JSON document itself: the HTML viewers load scripts from CDNs, which neither
    # an offline machine nor the CSP allows.
    return OpenAPIConfig(title="Feature Atlas", version="0.1.0", path="/schema", use_handler_docstrings=True,
                         render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"])],
                         components=Components(security_schemes=bearer if token else None))


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document a server without a token serves at /schema, built without an atlas: the
    docs' HTTP reference is rendered from it, so the reference is the schema (a test holds the two equal)."""
    unused = {name: Provide(lambda: None, sync_to_thread=False) for name in ("service", "pool", "searches", "statements")}
    app = Litestar(route_handlers=_routes(None), openapi_config=_openapi(None), request_class=StrictBodyRequest,
                   dependencies=unused)
    return app.openapi_schema.to_schema()
