"""How the gateway fails: one exception type with its HTTP status and code, and the JSON body
every failure answers with — ``{"error": {"code", "message"}, "request_id"}``, never a trace.

Bad input 4xx; feature store down 503; backend timeout or request deadline 504; unknown model,
version, experiment or arm 404; the backend failing 502.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from .logs import request_id_var

if TYPE_CHECKING:
    from .routing import Route


class GatewayError(Exception):
    """An error answered with ``status`` and a JSON body ``{"error": {"code", "message"}}``.
    ``route``: the arm and model version the request was routed to, when it got that far (the
    answer names them in its headers and metrics count the error under that arm)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.route: Route | None = None


class BodyTooLarge(HTTPException):
    """The body exceeds ``CTRSERVE_API_MAX_BODY_BYTES`` (an HTTPException, so that FastAPI's own
    body reading passes it through as 413 instead of turning it into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class OrjsonResponse(JSONResponse):
    """JSON via orjson (numpy arrays serialised natively)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def route_headers(route: Route | None) -> dict[str, str] | None:
    """The headers that name a routed request's arm and model version (errors after routing too)."""
    if route is None:
        return None
    return {"x-ctrserve-arm": route.arm, "x-ctrserve-model-version": f"{route.model}:{route.version}"}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> OrjsonResponse:
    """The error body; ``x-request-id`` names the request id the body names (the client's, the
    body's ``request_id`` once validated, or a generated one)."""
    rid = request_id_var.get()
    if rid is not None:
        headers = {**(headers or {}), "x-request-id": rid}
    return OrjsonResponse({"error": {"code": code, "message": message}, "request_id": rid},
                          status_code=status, headers=headers)


def gateway_error_response(exc: GatewayError) -> OrjsonResponse:
    return error_response(exc.status, exc.code, exc.message, route_headers(exc.route))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


def http_error_response(exc: HTTPException) -> OrjsonResponse:
    """Starlette's HTTP errors (unknown path, wrong method, body cap) in the gateway's error body."""
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                          headers=getattr(exc, "headers", None))
