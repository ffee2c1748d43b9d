"""Gateway test fixtures: the toy model repository and an in-process app over httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_toy import MemoryStore, write_toy_repo

from ctrserve.service.settings import (
    ApiSettings,
    BackendSettings,
    GatewaySettings,
    RoutingSettings,
    ServerSettings,
    StoreSettings,
)


@pytest.fixture(scope="session")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("toy_repo")
    write_toy_repo(repo, "toy", versions=(1, 2))
    return repo


ROUTING = """
experiments:
  - name: main
    salt: unit
    arms:
      - {name: control, model: toy, version: 1, weight: 50}
      - {name: treatment, model: toy, version: 2, weight: 50}
"""


def toy_settings(repo: Path, routing: Path | None = None, store_failure: str = "fail", **api: Any) -> GatewaySettings:
    return GatewaySettings(
        server=ServerSettings(access_log=False),
        api=ApiSettings(**api),
        store=StoreSettings(failure=store_failure),
        routing=RoutingSettings(config=routing),
        backend=BackendSettings(model_repository=repo, kind="onnxruntime", warmup_candidates=2),
    )


@asynccontextmanager
async def running(settings: GatewaySettings) -> AsyncIterator[tuple[httpx.AsyncClient, Any, list[MemoryStore]]]:
    """The app with its lifespan running, ready to score; yields (client, app, stores)."""
    from ctrserve.service.app import create_app, wait_ready

    stores: list[MemoryStore] = []

    def factory(schema, namespace, vocab_sha256):
        stores.append(MemoryStore(schema, namespace, vocab_sha256))
        return stores[-1]

    app = create_app(settings, store_factory=factory)
    async with app.router.lifespan_context(app):
        await wait_ready(app, 30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, app, stores


@pytest.fixture()
def routing_file(tmp_path: Path) -> Path:
    p = tmp_path / "routing.yaml"
    p.write_text(ROUTING)
    return p


@pytest.fixture()
def make_settings(toy_repo: Path, routing_file: Path) -> Callable[..., GatewaySettings]:
    def make(**api: Any) -> GatewaySettings:
        return toy_settings(toy_repo, routing_file, **api)

    return make


# -- end-to-end: a trained + exported model, a loaded Redis, gateway subprocesses -------------
@pytest.fixture(scope="session")
def exported(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    from gateway_e2e import train_and_export

    return train_and_export(tiny_prepared, tmp_path_factory.mktemp("gateway_e2e"))


@pytest.fixture(scope="module")
def store_url(redis_server, exported) -> str:
    """The session's redis-server holding the tiny dataset (bulk-loaded once per module)."""
    import asyncio

    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.loader import load_prepared

    redis_server.start()
    redis_server.flushall()
    asyncio.run(load_prepared(exported.prepared, RedisStoreConfig(url=redis_server.url)))
    return redis_server.url
