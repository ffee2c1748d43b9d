"""``ctrserve serve``: the scoring gateway (uvicorn) against Redis and either backend.

Every option also has an environment variable (docs/gateway.md); options win."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def serve_cmd(
    host: Annotated[str | None, typer.Option(help="interface to bind [CTRSERVE_SERVER_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [CTRSERVE_SERVER_PORT]")] = None,
    model_repository: Annotated[Path | None, typer.Option(
        help="exported model repository [CTRSERVE_BACKEND_MODEL_REPOSITORY]")] = None,
    routing: Annotated[Path | None, typer.Option(help="routing YAML [CTRSERVE_ROUTING_CONFIG]")] = None,
    watch: Annotated[bool | None, typer.Option(help="apply routing-file changes [CTRSERVE_ROUTING_WATCH]")] = None,
    triton_url: Annotated[str | None, typer.Option(
        help="Triton gRPC host:port; embedded ONNX Runtime when absent [CTRSERVE_BACKEND_TRITON_URL]")] = None,
    redis_url: Annotated[str | None, typer.Option(help="feature store [CTRSERVE_REDIS_URL]")] = None,
    store_failure: Annotated[str | None, typer.Option(
        help="fail (503) or degrade when Redis is down [CTRSERVE_STORE_FAILURE]")] = None,
    namespace: Annotated[str | None, typer.Option(
        help="feature-store namespace (default: the one each model's export manifest records) "
             "[CTRSERVE_STORE_NAMESPACE]")] = None,
    log_text: Annotated[bool, typer.Option("--log-text", help="plain-text logs instead of JSON")] = False,
    workers: Annotated[int | None, typer.Option(
        min=1, help="worker processes on one port (uvicorn's process manager); each loads its own model "
                    "sessions, Redis pool and item cache, and /metrics shows the worker that answers "
                    "[CTRSERVE_SERVER_WORKERS]")] = None,
) -> None:
    """Start the scoring gateway (FastAPI on uvicorn with uvloop/httptools)."""
    from pydantic import ValidationError

    from .app import run
    from .features import gateway_store_config, redis_factory
    from .settings import GatewaySettings

    # options become the environment: they win over it, and worker processes inherit them
    options = {"CTRSERVE_SERVER_HOST": host, "CTRSERVE_SERVER_PORT": port,
               "CTRSERVE_BACKEND_MODEL_REPOSITORY": model_repository, "CTRSERVE_ROUTING_CONFIG": routing,
               "CTRSERVE_ROUTING_WATCH": None if watch is None else str(watch).lower(),
               "CTRSERVE_BACKEND_TRITON_URL": triton_url, "CTRSERVE_REDIS_URL": redis_url,
               "CTRSERVE_STORE_FAILURE": store_failure, "CTRSERVE_STORE_NAMESPACE": namespace,
               "CTRSERVE_SERVER_LOG_JSON": "false" if log_text else None, "CTRSERVE_SERVER_WORKERS": workers}
    os.environ.update({k: str(v) for k, v in options.items() if v is not None})
    try:
        settings = GatewaySettings.from_env()
        store = gateway_store_config(settings.store.timeout_ms)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from None
    if settings.routing.config is not None and not Path(settings.routing.config).exists():
        typer.echo(f"error: routing config {settings.routing.config} does not exist", err=True)
        raise typer.Exit(2)
    run(settings, redis_factory(store), workers=settings.server.workers)
