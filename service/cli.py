"""``ctrserve serve``: the scoring gateway (uvicorn) against Redis and either backend.

Every option also has an environment variable (docs/gateway.md); options win."""

from __future__ import annotations

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
) -> None:
    """Start the scoring gateway (FastAPI on uvicorn with uvloop/httptools)."""
    from pydantic import ValidationError

    from ctrserve.feature_store.config import RedisStoreConfig

    from .app import run
    from .features import redis_factory
    from .settings import (
        ApiSettings,
        BackendSettings,
        GatewaySettings,
        RoutingSettings,
        ServerSettings,
        StoreSettings,
    )

    def pick(**kw: object) -> dict:
        return {k: v for k, v in kw.items() if v is not None}

    try:
        settings = GatewaySettings.from_env(
            server=ServerSettings(**pick(host=host, port=port, log_json=False if log_text else None)),
            api=ApiSettings(),
            store=StoreSettings(**pick(failure=store_failure, namespace=namespace)),
            routing=RoutingSettings(**pick(config=routing, watch=watch)),
            backend=BackendSettings(**pick(model_repository=model_repository, triton_url=triton_url)),
        )
        store = RedisStoreConfig(**pick(url=redis_url))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from None
    if settings.routing.config is not None and not Path(settings.routing.config).exists():
        typer.echo(f"error: routing config {settings.routing.config} does not exist", err=True)
        raise typer.Exit(2)
    run(settings, redis_factory(store))
