"""A private Redis Cluster (3 masters + 3 replicas on loopback, ``ctrserve.launch_cluster``) and a
``store_url`` fixture that runs a test once on the single redis-server and once on the cluster."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from ctrserve import launch
from ctrserve.launch_cluster import RedisClusterServer, start_redis_cluster


def _start(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[RedisClusterServer]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli not found on PATH (install them, e.g. `apt-get install redis-server`)")
    launcher = launch.Launcher(tmp_path_factory.mktemp(name), handle_signals=False)  # pytest keeps its own
    try:
        yield start_redis_cluster(launcher)
    finally:
        launcher.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """A running local cluster shared by the session; tests must not change its topology."""
    yield from _start(tmp_path_factory, "redis-cluster")


@pytest.fixture()
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """A cluster of this test's own (it may kill nodes and move slots)."""
    yield from _start(tmp_path_factory, "redis-cluster-own")


@pytest.fixture()
def cluster_url(redis_cluster: RedisClusterServer) -> str:
    """``redis+cluster://`` URL of the session's cluster, every master empty for this test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(params=["single", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The test runs twice: on one redis-server (``redis_url``) and on the cluster (``cluster_url``)."""
    return request.getfixturevalue("redis_url" if request.param == "single" else "cluster_url")
