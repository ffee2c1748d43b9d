"""The gateway on a real local Redis Cluster (3 masters + 3 replicas, ``cluster-node-timeout`` 1000
ms): it scores like on one node, and while a killed master's replica is not yet promoted, the
requests of users on that master get the configured answer (503, or degraded scores) within the
deadline, every other request succeeds, and after the promotion all succeed on the same gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from gateway_e2e import ROUTING_E2E, in_process_app, local_client
from redis.crc import key_slot

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def loaded_cluster(exported, tmp_path_factory: pytest.TempPathFactory):
    """A cluster of this module's own (the test kills a master), bulk-loaded with the tiny dataset."""
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.loader import load_prepared
    from ctrserve.launch import Launcher
    from ctrserve.launch_cluster import start_redis_cluster

    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not found on PATH")
    with Launcher(tmp_path_factory.mktemp("cluster"), handle_signals=False) as launcher:
        cluster = start_redis_cluster(launcher)
        version, _ = asyncio.run(load_prepared(exported.prepared, RedisStoreConfig(url=cluster.url)))
        yield cluster, version


def test_master_killed_gives_503_or_degraded_then_recovers(exported, loaded_cluster, tmp_path: Path) -> None:
    from ctrserve.feature_store.keys import Keys

    cluster, version = loaded_cluster
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING_E2E)
    keys = Keys("ctrserve:fs", exported.prepared.name, tagged=True)
    owner = cluster.slot_owners()
    victim = next(m for m in cluster.primaries() if m.port != owner[key_slot(keys.active.encode())])
    vocab = json.loads((exported.prepared / "vocab.json").read_text())
    on_victim = [u for u in vocab["user_id"] if owner[key_slot(keys.version(version).user(u).encode())] == victim.port]
    elsewhere = [u for u in vocab["user_id"] if u not in on_victim]
    items = [i for i in vocab["item_id"] if owner[key_slot(keys.version(version).item(i).encode())] != victim.port]

    def body(user: str) -> dict:
        return {"user_id": user, "candidates": [{"item_id": i} for i in items[:5]]}

    fail_app = in_process_app(exported, cluster.url, routing, 300, store={"timeout_ms": 300})
    degrade_app = in_process_app(exported, cluster.url, routing, 300, store={"failure": "degrade", "timeout_ms": 300})

    async def run() -> tuple[float, int, int]:
        async with local_client(fail_app) as fail, local_client(degrade_app) as degrade:
            for user in (on_victim[0], elsewhere[0]):  # scores as on one node
                r = await fail.post("/v1/score", json=body(user))
                assert r.status_code == 200 and "flags" not in r.json(), r.text
            killed = time.monotonic()
            cluster.kill(victim)
            outage = degraded = 0
            while time.monotonic() - killed < 30:
                t0 = time.monotonic()
                r = await fail.post("/v1/score", json=body(on_victim[outage % len(on_victim)]))
                # fast, whatever the answer (30-90 ms here; the bound leaves room for a busy CI machine)
                assert time.monotonic() - t0 < 2.0
                other = await fail.post("/v1/score", json=body(elsewhere[outage % len(elsewhere)]))
                assert other.status_code == 200, other.text  # other masters' users throughout
                if r.status_code == 200:
                    return time.monotonic() - killed, outage, degraded
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
                d = await degrade.post("/v1/score", json=body(on_victim[0]))
                assert d.status_code == 200, d.text  # degraded, or scored if the replica took over meanwhile
                degraded += d.json().get("flags") == {"degraded": True}
                outage += 1
                await asyncio.sleep(0.05)
            pytest.fail("the killed master's users did not score again within 30 s")

    window, answered_503, degraded = asyncio.run(run())
    assert answered_503 > 0 and degraded > 0 and window < 15, (answered_503, degraded, window)
    assert victim not in cluster.primaries()  # its replica took over
