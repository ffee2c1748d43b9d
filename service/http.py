"""The gateway's outermost ASGI layer, ``Front``: request ids, the body cap, per-request metrics
and the access log, for every HTTP request; and the direct path of ``POST /v1/score``.

Scoring requests go straight to ``api.score``: FastAPI's and Starlette's generic layers (server
error, exception handling, exit stacks, routing, dependency solving) do nothing for them and
cost a measurable share of the event loop's CPU per request (docs/decisions.md, "POST
/v1/score skips FastAPI's generic wrappers"). Everything else goes to the FastAPI app. While FastAPI's
OpenTelemetry instrumentation is on, scoring goes through FastAPI too (its route calls the same
``api.score``), so that it is traced.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTooLarge, error_response
from .logs import request_id_var
from .metrics import Metrics

log = logging.getLogger("ctrserve.service.api")
access = logging.getLogger("ctrserve.access")

#: route labels of the request metrics (anything else is "other": no unbounded label values)
ROUTES = {"/v1/score", "/v1/events", "/healthz", "/readyz", "/metrics", "/admin/routing", "/admin/routing/reload",
          "/admin/routing/assign", "/docs", "/openapi.json"}
EXPERIMENT_ROUTE = "/v1/experiments/{name}"
QUIET = ("/metrics", "/healthz", "/readyz")  # not in the access log

ScoreHandler = Callable[[Scope, Receive], Awaitable[Response]]


class Front:
    """Pure ASGI (no per-request task, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, score: ScoreHandler, metrics: Callable[[], Metrics | None],
                 max_body_bytes: int, access_log: bool = True, traced: Callable[[], bool] = lambda: False):
        """``app``: the FastAPI app for every other request; ``score``: ``api.score`` for this
        app; ``metrics``: the gateway's metrics once it has started; ``traced``: whether
        FastAPI's telemetry is on (scoring then goes through ``app``)."""
        self.app, self.score, self.metrics = app, score, metrics
        self.max_body = max_body_bytes
        self.access_log = access_log
        self.traced = traced
        # request ids when the client sends none: a random prefix per process and a counter, unique
        # like a uuid4 without a call to os.urandom per request
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or f"{self._id_prefix}{next(self._ids):016x}"
        token = request_id_var.set(rid)
        sent = _Sent()
        path = scope.get("path", "")

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent.started(message, rid)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent.complete = True
            await send(message)

        try:
            await self._answer(scope, receive, send_wrapped, headers.get(b"content-length"), sent)
        finally:
            self._observe(scope, path, sent, time.perf_counter() - t0)
            request_id_var.reset(token)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, length: bytes | None, sent: _Sent) -> None:
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await error_response(413, "body_too_large", f"request body exceeds {self.max_body} bytes")(
                scope, receive, send)
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
            if scope.get("method") == "POST" and scope.get("path") == "/v1/score" and not self.traced():
                response = await self.score(scope, receive_capped)
                await response(scope, receive_capped, send)
            else:
                await self.app(scope, receive_capped, send)
        except Exception:
            # a bug: the trace goes to the log, never to the client (answered here rather than by
            # Starlette's ServerErrorMiddleware, which would re-raise it into the server)
            log.exception("unhandled error")
            if sent.complete:  # answered already (FastAPI's server-error layer re-raises after its 500)
                return
            if sent.begun:
                raise
            await error_response(500, "internal", "internal error; the request id is in the gateway log")(
                scope, receive, send)

    def _observe(self, scope: Scope, path: str, sent: _Sent, elapsed: float) -> None:
        route = path if path in ROUTES else EXPERIMENT_ROUTE if path.startswith("/v1/experiments/") else "other"
        metrics = self.metrics()
        if metrics is not None and route != "/metrics":
            code = str(sent.status)
            metrics.child(metrics.requests, route, sent.arm, code).inc()
            metrics.child(metrics.latency, route, sent.arm, code).observe(elapsed)
        if self.access_log and route not in QUIET:
            access.info("request", extra={"method": scope.get("method"), "path": path, "status": sent.status,
                                          "ms": round(elapsed * 1000, 2), "arm": sent.arm})


class _Sent:
    """What the response said: its status and arm (from ``x-ctrserve-arm``, set by scoring)."""

    __slots__ = ("arm", "begun", "complete", "status")

    def __init__(self) -> None:
        self.status, self.arm, self.begun, self.complete = 500, "none", False, False

    def started(self, message: Message, rid: str) -> None:
        """Read the response's start; add ``x-request-id`` unless the response names its own."""
        self.status, self.begun = message["status"], True
        headers = message.get("headers", [])
        has_id = False
        for k, v in headers:
            if k == b"x-ctrserve-arm":
                self.arm = v.decode("latin-1")
            elif k == b"x-request-id":
                has_id = True
        if not has_id:
            message["headers"] = [*headers, (b"x-request-id", rid.encode("latin-1"))]
