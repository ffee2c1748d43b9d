"""The HTTP API: ``POST /v1/score``, the operations endpoints and the admin endpoints.

``POST /v1/score`` is one function, ``score``, over the raw ASGI request: the gateway's front
(``http.Front``) calls it directly, and the FastAPI route declared below calls the same function
(it is reached only while FastAPI's OpenTelemetry instrumentation is on, so that scoring is
traced then; the route's declaration is also what the OpenAPI schema shows). Checks answer in a
fixed order: the body is JSON (400), the gateway is ready (503), the API key (401), the body is a
valid request (422), then scoring's own answers (404, 422, 503, 504, 502).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope

from .errors import (
    GatewayError,
    OrjsonResponse,
    error_response,
    gateway_error_response,
    http_error_response,
    route_headers,
)
from .gateway import Gateway, ScoreResult
from .logs import request_id_var
from .request import (
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
    check_limits,
    decode_body,
    describe_errors,
    not_an_object,
    validate_score_request,
)
from .routing import Overrides

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": desc} for code, desc in {
    400: "Body is not valid JSON", 401: "Missing or wrong API key", 404: "Unknown model, version, experiment or arm",
    413: "Body too large", 422: "Invalid request (fields, limits, feature names or values)",
    502: "The model backend failed", 503: "Feature store unavailable or gateway not ready",
    504: "Backend timeout or request deadline exceeded"}.items()}


def started(app: Any) -> Gateway:
    """The app's gateway, or 503 while it is starting."""
    gw = getattr(app.state, "gateway", None)
    if gw is None:
        raise GatewayError(503, "not_ready", "the gateway is starting")
    return gw


def check_api_key(gw: Gateway, given: str) -> None:
    key = gw.settings.api.key
    if key is None:
        return
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise GatewayError(401, "unauthorized", "missing or wrong X-API-Key header")


# -- POST /v1/score ----------------------------------------------------------------------------
async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":  # the client left while sending
            raise HTTPException(400, "There was an error parsing the body")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header; ``name`` in lower case."""
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


async def score(app: FastAPI, scope: Scope, receive: Receive) -> Response:
    """Answer one ``POST /v1/score`` (the response names the arm and model version it took)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    try:
        content_type = _header(headers, b"content-type")
        value = decode_body(await read_body(receive), content_type, app.state.fast_decode)
        gw = started(app)
        check_api_key(gw, _header(headers, b"x-api-key") or "")
        rs = gw.settings.routing
        qa = Overrides(experiment=_header(headers, rs.experiment_header.lower().encode("latin-1")) or None,
                       arm=_header(headers, rs.arm_header.lower().encode("latin-1")) or None)
        early = gw.begin_read(value, qa)
        try:
            request = validate_score_request(value, content_type)
            if request.request_id:
                request_id_var.set(request.request_id)
            check_limits(request, gw.settings.api)
            gw.metrics.candidates.observe(len(request.candidates))
            result = await gw.score(request, qa, early)
            loop = getattr(app.state, "loop", None)
            if loop is not None:  # queued for the background writer: no Redis call before the answer
                loop.log.add(request_id_var.get(), request.user_id, result.route, request.item_ids, result.scores,
                             result.inputs)
            return score_response(result)
        finally:
            if early is not None:
                early.cancel()  # a no-op when scoring collected it
    except GatewayError as exc:
        return gateway_error_response(exc)
    except HTTPException as exc:  # the body cap, a client gone while sending the body
        return http_error_response(exc)


def score_response(result: ScoreResult) -> OrjsonResponse:
    rid = request_id_var.get()
    route = result.route
    out: dict[str, Any] = {"request_id": rid, "model": route.model, "version": route.version, "arm": route.arm,
                           "scores": result.scores}
    if result.flags:
        out["flags"] = result.flags
    headers = route_headers(route)
    headers["x-request-id"] = rid  # type: ignore[index]
    return OrjsonResponse(out, headers=headers)


SCORE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}}

router = APIRouter()


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["scoring"], openapi_extra=SCORE_BODY)
async def score_route(request: Request) -> Response:
    """Score a batch of candidates for one user: one click probability per candidate, in request
    order. The body is a `ScoreRequest`; `X-Ctrserve-Arm` / `X-Ctrserve-Experiment` force an arm
    or pick an experiment (QA); the answer's `X-Ctrserve-Arm` and `X-Ctrserve-Model-Version`
    headers name the arm and model version (errors after routing too)."""
    return await score(request.app, request.scope, request.receive)


# -- operations ------------------------------------------------------------------------------
async def gateway(request: Request) -> Gateway:
    # ``async def``: FastAPI runs a plain-``def`` dependency in its thread pool (two hand-offs)
    return started(request.app)


@router.get("/healthz", tags=["operations"])
async def healthz() -> Response:
    """The process is alive (no dependency is checked)."""
    return OrjsonResponse({"status": "ok"})


@router.get("/readyz", tags=["operations"], responses={503: {"description": "Not ready; the body says why"}})
async def readyz(gw: Gateway = Depends(gateway)) -> Response:
    """Ready when Redis answers and every model of the routing config is loaded and warmed up.
    `config_error` (when present) says the gateway cannot start without a configuration change
    (no routing file and a repository that does not hold exactly one model, or a bad file).
    `providers` says where each loaded model version computes (`cpu`, `cuda`, `triton`)."""
    ok, checks = await gw.readiness()
    body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks,
                            "providers": gw.registry.placement()}
    if gw.config_error:
        body["config_error"] = gw.startup_error
    return OrjsonResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    """Prometheus metrics (the outcomes per arm are read from Redis, shared by every replica)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from .events import refresh_metrics

    await refresh_metrics(request.app, gw)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- error handlers (routes other than the direct POST /v1/score) ------------------------------
async def _on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return gateway_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "invalid_json", "request body is not valid JSON")
    if len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",):
        return gateway_error_response(not_an_object(request.headers.get("content-type")))
    return error_response(422, "invalid_request", describe_errors(errors))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return http_error_response(exc)


def install(app: FastAPI) -> None:
    from .admin import router as admin_router
    from .events import router as events_router

    app.include_router(router)
    app.include_router(events_router)
    app.include_router(admin_router)
    app.add_exception_handler(GatewayError, _on_gateway_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the request models the routes take raw (not as FastAPI parameters)."""
    from pydantic.json_schema import models_json_schema

    from .events import EventBatch

    _, schema = models_json_schema([(ScoreRequest, "validation"), (EventBatch, "validation")],
                                   ref_template="#/components/schemas/{model}")
    return schema.get("$defs", {})
