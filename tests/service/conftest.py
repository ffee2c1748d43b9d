"""Gateway test fixtures: the toy model repository and an in-process app over httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_e2e import ADMIN_TOKEN, ROUTING_E2E, GatewayProcess
from gateway_toy import ROUTING, toy_settings, write_toy_repo

from ctrserve.service.settings import GatewaySettings


@pytest.fixture(scope="session")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("toy_repo")
    write_toy_repo(repo, "toy", versions=(1, 2))
    return repo


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


@pytest.fixture(scope="module")
def routing_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("routing") / "routing.yaml"
    p.write_text(ROUTING_E2E)
    return p


@pytest.fixture(scope="module")
def gateway(exported, store_url, routing_path, tmp_path_factory):
    """The gateway on embedded ONNX Runtime, routing control (v1, 70 %) / treatment (v2, 30 %)."""
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    gw = GatewayProcess(exported.repo, store_url, log, env={"CTRSERVE_API_ADMIN_TOKEN": ADMIN_TOKEN},
                        args=["--routing", str(routing_path)])
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()
