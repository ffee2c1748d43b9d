"""HTTP API: request/response models, limits, authentication and error mapping.

Every failure is a JSON body ``{"error": {"code", "message"}, "request_id"}`` with a 4xx/5xx
status chosen here — bad input 4xx, feature store down 503, backend timeout 504, unknown
model/version/arm 404 — and never a stack trace.
"""

from __future__ import annotations

import email.message
import functools
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, NotRequired

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from .gateway import EarlyRead, Gateway, GatewayError
from .logs import request_id_var
from .routing import RoutingError, parse_config, parse_yaml

log = logging.getLogger("ctrserve.service.api")

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None
#: a raw value as in the dataset; a list (most recent first) for a behaviour-sequence field
FeatureValue = Scalar | Annotated[list[Scalar], Field(max_length=1000)]


class OrjsonResponse(JSONResponse):
    """JSON via orjson (numpy arrays serialised natively)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# -- request / response models ---------------------------------------------------------------
class Candidate(TypedDict):
    """A TypedDict, not a BaseModel: the same validation and schema, but validated candidates stay
    dicts — no model object built per candidate (part of the drop in the gateway's CPU per request,
    ``ctrserve bench gateway --sections cpu``, docs/gateway.md session 5)."""

    __pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)  # type: ignore[misc]
    item_id: Annotated[Id, Field(description="Raw item id (as in the dataset); numbers are accepted as strings.")]
    features: NotRequired[Annotated[dict[FeatureName, FeatureValue] | None, Field(
        description="Raw item or context feature values overriding the stored ones for this candidate.")]]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False, json_schema_extra={
        "examples": [{"user_id": "42", "context": {"device": 0, "hour": 20},
                      "candidates": [{"item_id": "7"}, {"item_id": "11", "features": {"price": 19.9}}]}]})
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")] | None = \
        Field(None, description="Echoed back and logged; generated when absent.")
    user_id: Id = Field(description="Raw user id; also the A/B hashing key.")
    context: dict[FeatureName, FeatureValue] | None = Field(
        None, description="Raw request-time features (context side) and user-side overrides (profile values, or "
                          "a whole behaviour sequence as lists, most recent first).")
    candidates: list[Candidate] = Field(min_length=1, description="Items to score (at most the configured "
                                                                   "maximum, default 1000); scores keep this order.")
    model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}(:[0-9]{1,9})?$")] | None = \
        Field(None, description="Bypass the A/B split: `name` (newest served version) or `name:version`.")


class ScoreResponse(BaseModel):
    request_id: str
    model: str
    version: int
    arm: str
    scores: list[float] = Field(description="Click probabilities, one per candidate, in request order.")
    flags: dict[str, Any] | None = Field(
        None, description="Present when something is off: `degraded` (store down, cold-start features), "
                          "`user_missing`, `missing_items` (item ids not in the store).")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None = None


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> OrjsonResponse:
    return OrjsonResponse({"error": {"code": code, "message": message}, "request_id": request_id_var.get()},
                          status_code=status, headers=headers)


_ERRORS = {code: {"model": ErrorResponse, "description": desc} for code, desc in {
    400: "Body is not valid JSON", 401: "Missing or wrong API key", 404: "Unknown model, version, experiment or arm",
    413: "Body too large", 422: "Invalid request (fields, limits, feature names or values)",
    502: "The model backend failed", 503: "Feature store unavailable or gateway not ready",
    504: "Backend timeout or request deadline exceeded"}.items()}


# -- dependencies ----------------------------------------------------------------------------
# ``async def``, not ``def``: FastAPI runs a plain-``def`` dependency in its thread pool, i.e. two
# thread hand-offs per scoring request for a few attribute reads (cheap on an idle machine,
# ``ctrserve bench gateway --sections deps``; each hand-off waits for a core on a busy one)
async def gateway(request: Request) -> Gateway:
    return _started(request.app)


def _started(app: Any) -> Gateway:
    gw = getattr(app.state, "gateway", None)
    if gw is None:
        raise GatewayError(503, "not_ready", "the gateway is starting")
    return gw


async def require_api_key(request: Request, gw: Gateway = Depends(gateway)) -> None:
    _check_api_key(gw, request.headers.get("x-api-key", ""))


def _check_api_key(gw: Gateway, given: str) -> None:
    key = gw.settings.api.key
    if key is None:
        return
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise GatewayError(401, "unauthorized", "missing or wrong X-API-Key header")


async def require_admin(request: Request, gw: Gateway = Depends(gateway)) -> None:
    token = gw.settings.api.admin_token
    if token is None:
        raise GatewayError(403, "admin_disabled", "admin endpoints are disabled: set CTRSERVE_API_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise GatewayError(401, "unauthorized", "admin endpoints need 'Authorization: Bearer <admin token>'")


# -- routes ----------------------------------------------------------------------------------
router = APIRouter()


@router.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, tags=["scoring"],
             dependencies=[Depends(require_api_key)])
async def score(body: ScoreRequest, request: Request, gw: Gateway = Depends(gateway)) -> Response:
    """Score one user's candidates with the model of the user's A/B arm (or the requested model)."""
    # declared for the OpenAPI schema; requests take ``score_asgi`` (the same answers, checked by
    # tests/service/test_score_fast_path.py) unless the middleware's fast path is off
    return await _score(body, gw, request.headers.get, request.scope.setdefault("state", {}))


async def _score(body: ScoreRequest, gw: Gateway, header: Callable[[str], str | None], state: dict[str, Any],
                 early: EarlyRead | None = None) -> Response:
    """The scoring endpoint's work once the body is validated; ``header(name)`` reads a request
    header, ``state`` is the request's scope state (request id, arm and model for the middleware),
    ``early`` the feature-store read sent before validation (``score_asgi``)."""
    if body.request_id:
        request_id_var.set(body.request_id)
        state["request_id"] = body.request_id
    api = gw.settings.api
    n = len(body.candidates)
    if n > api.max_candidates:
        raise GatewayError(422, "too_many_candidates", f"{n} candidates; at most {api.max_candidates} per request")
    if body.context and len(body.context) > api.max_feature_keys:
        raise GatewayError(422, "too_many_features", f"context has {len(body.context)} keys; at most "
                                                     f"{api.max_feature_keys}")
    features = [c.get("features") for c in body.candidates]
    for i, f in enumerate(features):
        if f and len(f) > api.max_feature_keys:
            raise GatewayError(422, "too_many_features", f"candidates[{i}].features has {len(f)} keys; "
                                                         f"at most {api.max_feature_keys}")
    gw.metrics.candidates.observe(n)
    rs = gw.settings.routing
    label: list[str] = []
    try:
        result = await gw.score(
            body.user_id, [c["item_id"] for c in body.candidates], body.context, features,
            model=body.model, experiment=header(rs.experiment_header) or None,
            arm=header(rs.arm_header) or None, route_label=label, early=early)
    finally:
        state["arm"] = label[0] if label else "none"
        if label:  # the middleware names them in the response headers, errors included
            state["model_version"] = label[1]
    out: dict[str, Any] = {"request_id": request_id_var.get(), "model": result.model, "version": result.version,
                           "arm": result.arm, "scores": result.scores}
    if result.flags:
        out["flags"] = result.flags
    return OrjsonResponse(out)


@router.get("/healthz", tags=["operations"])
async def healthz() -> Response:
    """The process is alive (no dependency is checked)."""
    return OrjsonResponse({"status": "ok"})


@router.get("/readyz", tags=["operations"], responses={503: {"description": "Not ready; the body says why"}})
async def readyz(gw: Gateway = Depends(gateway)) -> Response:
    """Ready when Redis answers and every model of the routing config is loaded and warmed up."""
    ok, checks = await gw.readiness()
    return OrjsonResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", tags=["operations"])
async def metrics(gw: Gateway = Depends(gateway)) -> Response:
    """Prometheus metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/routing", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS)
async def get_routing(gw: Gateway = Depends(gateway)) -> Response:
    """The routing config in effect."""
    from .gateway import config_digest

    if gw.table is None:
        raise GatewayError(503, "not_ready", f"no routing config in effect: {gw.startup_error}")
    cfg = gw.table.router.config
    return OrjsonResponse({"digest": config_digest(cfg), "config": cfg.model_dump(mode="json")})


@router.put("/admin/routing", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}}}}})
async def put_routing(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    """Validate a new routing config (YAML or JSON body), load its models, then swap it in
    atomically. A bad config answers 422 and the previous one stays in effect."""
    raw = await request.body()
    try:
        if "json" in request.headers.get("content-type", ""):
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise RoutingError(f"body is not valid JSON: {exc}") from None
            config = parse_config(doc, "request body")
        else:
            config = parse_yaml(raw, "request body")
    except RoutingError as exc:
        gw.metrics.reloads.labels("admin", "rejected").inc()
        raise GatewayError(422, "routing_rejected", str(exc)) from None
    try:
        digest = await gw.apply(config, "admin")  # counts its own rejections
    except RoutingError as exc:
        raise GatewayError(422, "routing_rejected", str(exc)) from None
    return OrjsonResponse({"status": "applied", "digest": digest})


@router.post("/admin/routing/reload", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS)
async def reload_routing(gw: Gateway = Depends(gateway)) -> Response:
    """Re-read the routing file (CTRSERVE_ROUTING_CONFIG) and apply it like PUT does."""
    try:
        digest = await gw.reload_file("admin")
    except RoutingError as exc:
        raise GatewayError(422, "routing_rejected", str(exc)) from None
    return OrjsonResponse({"status": "applied", "digest": digest})


class AssignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    user_ids: list[Id] = Field(min_length=1, max_length=100_000)
    experiment: str | None = Field(None, description="Experiment to assign in (default: the config's default).")


@router.post("/admin/routing/assign", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS)
async def assign(body: AssignRequest, gw: Gateway = Depends(gateway)) -> Response:
    """Which arm (and bucket) each user gets under the config in effect — the same function
    ``/v1/score`` routes with; for QA and for checking a split without scoring."""
    from .routing import NotFound

    table = gw.table
    if table is None:
        raise GatewayError(503, "not_ready", f"no routing config in effect: {gw.startup_error}")
    try:
        routes = [table.router.assign(u, body.experiment) for u in body.user_ids]
    except NotFound as exc:
        raise GatewayError(404, "not_found", str(exc)) from None
    return OrjsonResponse({"experiment": routes[0].experiment, "arms": [r.arm for r in routes],
                           "buckets": [r.bucket for r in routes]})


# -- error handlers --------------------------------------------------------------------------
def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


async def _on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc.status, exc.code, exc.message)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _validation_response(exc.errors(), request.headers.get("content-type"))


def _validation_response(errors: Any, content_type: str | None) -> Response:
    """The 400/422 answer to FastAPI-style validation errors (``loc`` starting with ``"body"``)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "invalid_json", "request body is not valid JSON")
    if len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",):
        ctype = content_type or "none"
        return error_response(422, "invalid_request", f"the body must be a JSON object (Content-Type: "
                                                      f"application/json; got {ctype})")
    # the messages name the field and the rule, never echo the (possibly huge) input
    msgs = [f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors[:10]]
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return error_response(422, "invalid_request", "; ".join(msgs) + more)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return _http_error_response(exc)


def _http_error_response(exc: StarletteHTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                          headers=getattr(exc, "headers", None))


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.add_exception_handler(GatewayError, _on_gateway_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)


# -- POST /v1/score without FastAPI's generic request handling -------------------------------
# FastAPI's per-request machinery (its middleware layers, exit stacks, dependency solving, the
# Request object, telemetry hooks) was a large share of the event loop's CPU per scoring request
# (``ctrserve bench gateway --sections asgi`` measures the fast path on and off). The middleware
# hands POST /v1/score to ``score_asgi``, which answers exactly as FastAPI does for the route
# above, in its order: read the body (400 when it is not JSON, checked before anything else),
# the gateway's readiness (503), the API key (401), then validation (422, pydantic's messages).
# FastAPI decodes JSON only under an application/json (or +json) content type, otherwise the raw
# bytes fail validation; decoding is the stdlib ``json`` as in FastAPI, because orjson reads
# integers beyond 64 bits as floats, which would change numeric ids coerced to strings.

class _Missing:
    """No body at all (FastAPI: a required body field is missing)."""


_MISSING = _Missing()


@functools.lru_cache(maxsize=64)
def _is_json_content_type(value: str) -> bool:
    """FastAPI's test, with its parser: ``application/json`` or ``application/*+json``."""
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header (as Starlette's ``request.headers.get``); ``name`` lower case."""
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":  # FastAPI: any error reading the body is a 400
            raise StarletteHTTPException(400, "There was an error parsing the body")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise GatewayError(400, "invalid_json", "request body is not valid JSON") from None
    except Exception:  # e.g. not UTF-8/16/32: FastAPI answers this 400 without the JSON code
        raise StarletteHTTPException(400, "There was an error parsing the body") from None


def _validate(value: Any) -> tuple[ScoreRequest | None, list[dict[str, Any]]]:
    """The body validated as FastAPI validates a single body model (``loc`` prefixed ``body``)."""
    if value is _MISSING:
        return None, [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    try:
        return ScoreRequest.model_validate(value, from_attributes=True), []
    except ValidationError as exc:
        return None, [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]


def _begin_read(gw: Gateway, value: Any, header: Callable[[str], str | None]) -> EarlyRead | None:
    """Send the feature-store read of a well-formed decoded body before validating it (inline
    execution; ``Gateway.begin_read``). Only plain shapes qualify — a string user id, candidates
    as objects whose ``item_id`` is a string or an integer (pydantic turns it into the same
    string), within the candidate limit; anything else is left to validation and the usual read."""
    if type(value) is not dict:
        return None
    user, candidates, model = value.get("user_id"), value.get("candidates"), value.get("model")
    if type(user) is not str or type(candidates) is not list or (model is not None and type(model) is not str) \
            or not 0 < len(candidates) <= gw.settings.api.max_candidates:
        return None
    ids = []
    for c in candidates:
        item = c.get("item_id") if type(c) is dict else None
        if type(item) is str:
            ids.append(item)
        elif type(item) is int:
            ids.append(str(item))
        else:
            return None
    rs = gw.settings.routing
    return gw.begin_read(user, ids, model, header(rs.experiment_header) or None, header(rs.arm_header) or None)


async def score_asgi(scope: Scope, receive: Receive) -> Response:
    """POST /v1/score as an ASGI call; returns the response (the caller sends it)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    try:
        raw = await _read_body(receive)
        content_type = _header(headers, b"content-type")
        value: Any = _MISSING
        if raw:
            value = _decode(raw) if content_type and _is_json_content_type(content_type) else raw
        gw = _started(scope["app"])
        _check_api_key(gw, _header(headers, b"x-api-key") or "")

        def header(name: str) -> str | None:
            return _header(headers, name.lower().encode("latin-1"))

        early = _begin_read(gw, value, header)
        try:
            body, errors = _validate(value)
            if body is None:
                return _validation_response(errors, content_type)
            return await _score(body, gw, header, scope["state"], early)
        finally:
            if early is not None:
                early.pending.cancel()  # a no-op when scoring collected it
    except GatewayError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except StarletteHTTPException as exc:  # the body cap, a client gone while sending the body
        return _http_error_response(exc)


# -- ASGI middleware: request id, body cap, metrics, access log ------------------------------
ROUTES = {"/v1/score", "/healthz", "/readyz", "/metrics", "/admin/routing", "/admin/routing/reload",
          "/admin/routing/assign", "/docs", "/openapi.json"}


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class GatewayMiddleware:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): cheap enough for every request.
    ``fast_score``: POST /v1/score goes to ``score_asgi`` instead of through FastAPI (off: the
    FastAPI route answers; tests and ``ctrserve bench gateway`` compare the two)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, access_log: bool = True, fast_score: bool = True):
        self.app = app
        self.max_body = max_body_bytes
        self.access_log = access_log
        self.fast_score = fast_score
        self.log = logging.getLogger("ctrserve.access")
        # request ids when the client sends none: a random prefix per process and a counter, unique
        # like a uuid4 without a call to os.urandom per request (~2 % of the Python per request, a
        # py-spy of the in-process app, docs/gateway.md session 10)
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count()

    def takes(self, scope: Scope) -> bool:
        """Whether ``scope`` is a request for the fast path (POST /v1/score, fast path on)."""
        return self.fast_score and scope.get("path") == "/v1/score" and scope.get("method") == "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or f"{self._id_prefix}{next(self._ids):016x}"
        token = request_id_var.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = {"code": 500, "started": False}
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                rid_now = state.get("request_id", rid)
                extra = [(b"x-request-id", rid_now.encode("latin-1"))]
                if "model_version" in state:  # known once /v1/score routed the request (errors after it too)
                    extra += [(b"x-ctrserve-arm", state["arm"].encode("latin-1")),
                              (b"x-ctrserve-model-version", state["model_version"].encode("latin-1"))]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                resp = error_response(413, "body_too_large", f"request body exceeds {self.max_body} bytes")
                await resp(scope, receive, send_wrapped)
                return
            received = 0

            async def receive_capped() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge(self.max_body)
                return message

            try:
                if self.takes(scope):
                    resp = await score_asgi(scope, receive_capped)
                    await resp(scope, receive_capped, send_wrapped)
                else:
                    await self.app(scope, receive_capped, send_wrapped)
            except Exception:
                # a bug: the trace goes to the log, never to the client (answered here rather than
                # by Starlette's ServerErrorMiddleware, which would re-raise it into the server)
                log.exception("unhandled error")
                if status["started"]:
                    raise
                resp = error_response(500, "internal", "internal error; the request id is in the gateway log")
                await resp(scope, receive, send_wrapped)
        finally:
            elapsed = time.perf_counter() - t0
            gw = _gateway_of(scope)
            arm = state.get("arm", "none")
            code = str(status["code"])
            if gw is not None and route != "/metrics":
                m = gw.metrics
                m.child(m.requests, route, arm, code).inc()
                m.child(m.latency, route, arm, code).observe(elapsed)
            if self.access_log and route not in ("/metrics", "/healthz", "/readyz"):
                self.log.info("request", extra={"method": scope.get("method"), "path": path, "status": status["code"],
                                                "ms": round(elapsed * 1000, 2), "arm": arm})
            request_id_var.reset(token)


def _gateway_of(scope: Scope) -> Gateway | None:
    app = scope.get("app")
    state = getattr(app, "state", None)
    return getattr(state, "gateway", None)
