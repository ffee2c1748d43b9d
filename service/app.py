"""FastAPI app factory and the process entry point (uvicorn with uvloop and httptools).

Lifespan: build the model registry (embedded ONNX Runtime, or the Triton client), the feature
stores, and the gateway; apply the routing config in the background (loading and warming every
referenced model) so ``/healthz`` answers at once and ``/readyz`` turns ready when the gateway can
score. Shutdown: uvicorn stops accepting, in-flight requests finish (``graceful_shutdown_s``),
then models and Redis connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import api
from .errors import OrjsonResponse, error_response
from .features import FeatureStores, StoreFactory, gateway_store_config, redis_factory
from .gateway import Gateway
from .http import Front
from .metrics import Metrics
from .registry import ModelRegistry
from .settings import GatewaySettings

log = logging.getLogger("ctrserve.service")


class GatewayApp(FastAPI):
    """FastAPI behind the gateway's own front (``http.Front``): every request enters the front,
    which answers ``POST /v1/score`` directly and hands everything else to FastAPI."""

    front: Front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)

    def telemetry_on(self) -> bool:
        """FastAPI's OpenTelemetry instrumentation is active (a provider is configured)."""
        telemetry = getattr(self, "_native_telemetry", None)
        return telemetry is not None and telemetry.enabled()

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(api.openapi_components())
        return self.openapi_schema  # type: ignore[return-value]


def create_app(settings: GatewaySettings | None = None, store_factory: StoreFactory | None = None) -> GatewayApp:
    """The gateway app. ``store_factory`` replaces the Redis store (unit tests only)."""
    settings = settings or GatewaySettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        triton = None
        kind = settings.backend_kind
        if kind == "triton":
            if not settings.backend.triton_url:
                raise RuntimeError("CTRSERVE_BACKEND_KIND=triton needs CTRSERVE_BACKEND_TRITON_URL")
            from .backends.triton import TritonClient

            triton = TritonClient(settings.backend.triton_url)
        factory = store_factory
        if factory is None:
            factory = redis_factory(gateway_store_config(settings.store.timeout_ms))
        stores = FeatureStores(factory, settings.store.namespace)
        gw = Gateway(settings, ModelRegistry(settings.backend, kind, triton), stores)
        app.state.gateway = gw
        redis_config = getattr(factory, "redis_config", None)  # None: a test's in-memory stores
        loop_on = redis_config is not None and settings.feedback.enabled
        if loop_on and redis_config.cluster:
            # the events script and the log writer address one node: on a cluster they would fail
            # in the background, so the loop is off and /v1/events answers 503 instead
            log.warning("closed loop off: it needs one Redis node, and the store is a Redis Cluster")
            loop_on = False
        app.state.loop = _start_loop(settings, gw, redis_config) if loop_on else None
        tasks = [asyncio.create_task(gw.start(), name="gateway-start")]
        if settings.routing.watch and settings.routing.config is not None:
            tasks.append(asyncio.create_task(gw.watch(), name="routing-watch"))
        log.info("gateway starting", extra={"backend": kind, "repository": str(settings.backend.model_repository),
                                            "routing": str(settings.routing.config or "single model")})
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if app.state.loop is not None:
                await app.state.loop.close()
            await gw.close()
            if triton is not None:
                await triton.close()
            log.info("gateway stopped")

    app = GatewayApp(
        title="ctrserve scoring gateway",
        version="0.1.0",
        description="Click-through-rate scoring: one user, a batch of candidates, one probability per candidate. "
                    "A/B arms by salted user hash; features from the Redis feature store.",
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    api.install(app)
    app.state.fast_decode = settings.api.decoder == "msgspec"  # read before the gateway exists (api.score)
    app.add_exception_handler(Exception, _internal_error)  # a bug in a FastAPI route: JSON 500, no trace

    def metrics() -> Metrics | None:
        gw = getattr(app.state, "gateway", None)
        return gw.metrics if gw is not None else None

    app.front = Front(functools.partial(FastAPI.__call__, app), functools.partial(api.score, app), metrics,
                      settings.api.max_body_bytes, settings.server.access_log, app.telemetry_on)
    return app


def _start_loop(settings: GatewaySettings, gw: Gateway, redis_config: Any) -> Any:
    """The closed loop (service/events.py) on the feature store's Redis, its writer started."""
    from ctrserve.feature_store.feedback import FeedbackStore

    from .events import Loop
    from .impressions import ImpressionLog

    fb = settings.feedback
    store = FeedbackStore(redis_config, fb.request_ttl_s, fb.log_max_len)
    loop = Loop(store, ImpressionLog(store, fb, gw.metrics), fb.append_clicks)
    loop.log.start()
    return loop


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal", "internal error; the request id is in the gateway log")


async def wait_ready(app: FastAPI, timeout: float = 60.0) -> None:
    """Wait until the app's gateway has a routing config in effect (tests, demo)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        gw = getattr(app.state, "gateway", None)
        if gw is not None and gw.table is not None:
            return
        await asyncio.sleep(0.05)
    gw = getattr(app.state, "gateway", None)
    raise TimeoutError(f"gateway not ready after {timeout:g} s: {gw.startup_error if gw else 'not started'}")


def create_app_from_env() -> FastAPI:
    """The app of one worker process (uvicorn factory mode): settings from the environment, which
    ``ctrserve serve`` fills from its options before starting the workers."""
    from .logs import configure_logging

    settings = GatewaySettings.from_env()
    configure_logging(settings.server.log_level, settings.server.log_json)
    return create_app(settings)


#: the factory worker processes import (uvicorn needs an import string to start several)
WORKER_FACTORY = "ctrserve.service.app:create_app_from_env"


def uvicorn_options(settings: GatewaySettings) -> dict[str, object]:
    return {"host": settings.server.host, "port": settings.server.port, "loop": "uvloop", "http": "httptools",
            "log_config": None, "access_log": False, "lifespan": "on",
            "timeout_graceful_shutdown": int(max(1, settings.server.graceful_shutdown_s))}


def run(settings: GatewaySettings | None = None, store_factory: StoreFactory | None = None, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM (in-flight requests drain first). ``workers > 1``: uvicorn's
    process manager starts that many processes on one socket, each building its own app from the
    environment (its own ONNX Runtime sessions, Redis pool, item cache and metrics); ``settings``
    and ``store_factory`` then only serve the parent's checks — the environment must hold them."""
    import uvicorn

    from .logs import configure_logging

    settings = settings or GatewaySettings.from_env()
    configure_logging(settings.server.log_level, settings.server.log_json)
    if workers > 1:
        uvicorn.run(WORKER_FACTORY, factory=True, workers=workers, **uvicorn_options(settings))  # type: ignore[arg-type]
        return
    config = uvicorn.Config(create_app(settings, store_factory), **uvicorn_options(settings))  # type: ignore[arg-type]
    uvicorn.Server(config).run()
