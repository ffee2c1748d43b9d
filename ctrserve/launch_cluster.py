"""A private Redis Cluster on loopback for tests, benchmarks and the demo: ``masters`` masters and
``replicas`` replicas per master, each a ``redis-server`` child of the project's ``Launcher``
(``ctrserve.launch``), formed with ``redis-cli --cluster create``.

Every node gets its own data dir (its ``nodes.conf`` lives there, so a killed node started again
rejoins as a replica), a free client port and a free cluster-bus port (``--cluster-port``: the
default, client port + 10000, may be taken on a shared machine). ``cluster-require-full-coverage
no`` lets the surviving masters answer while one master's slots have no owner (the minutes of a
failover); ``node_timeout_ms`` is ``cluster-node-timeout``, which bounds how soon a dead master is
declared failed and its replica promoted (docs/deploy.md, "Redis Cluster"). ``failover_run`` is
the drill the benchmark and the tests run on it.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ctrserve.launch import Launcher, LaunchError, Pending, RedisServer, wait_ready
from ctrserve.net import LOOPBACK, free_port

#: cluster-node-timeout of the local cluster: short, so a failover takes seconds (production: 15000)
LOCAL_NODE_TIMEOUT_MS = 1000


@dataclass
class NodeState:
    """One line of ``CLUSTER NODES`` as seen by a live node."""

    node_id: str
    port: int
    master: bool
    failed: bool
    master_id: str | None
    slots: list[tuple[int, int]] = field(default_factory=list)


def _parse_nodes(text: str) -> list[NodeState]:
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        flags = parts[2].split(",")
        slots = []
        for spec in parts[8:]:
            if spec.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = spec.partition("-")
            slots.append((int(lo), int(hi or lo)))
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        nodes.append(NodeState(parts[0], port, "master" in flags, "fail" in flags or "fail?" in flags,
                               None if parts[3] == "-" else parts[3], slots))
    return nodes


class RedisClusterServer:
    """A local Redis Cluster owned by a launcher. ``url`` (``redis+cluster://host:port``) is what
    the feature store's ``CTRSERVE_REDIS_URL`` takes; ``nodes`` are the ``RedisServer`` children."""

    def __init__(self, launcher: Launcher, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = LOCAL_NODE_TIMEOUT_MS, host: str = LOOPBACK):
        if masters < 3:
            raise LaunchError("redis-cli --cluster create needs at least 3 masters")
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise LaunchError("redis-cli not found on PATH (it comes with redis-server, e.g. `apt-get install "
                              "redis-server`)")
        self.launcher, self.host, self.node_timeout_ms = launcher, host, node_timeout_ms
        self.masters, self.replicas = masters, replicas
        self.start_s = 0.0  #: seconds ``start_redis_cluster`` took (nodes up, cluster formed, replicas in sync)
        self.nodes = [
            RedisServer(launcher, host=host, name=f"redis-cluster-{i}", extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(free_port(host)),
                "--cluster-require-full-coverage", "no",
                # a replica syncs at once instead of after the default 5 s wait for more replicas
                "--repl-diskless-sync-delay", "0"])
            for i in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        live = next((n for n in self.nodes if n.running), self.nodes[0])
        return f"redis+cluster://{self.host}:{live.port}/0"

    def start(self, timeout: float = 30.0) -> RedisClusterServer:
        """Start every node, form the cluster (the first ``masters`` nodes own the slots) and wait
        until every node sees all slots covered and every replica in sync."""
        for node in self.nodes:
            node.start()
        addrs = [f"{self.host}:{n.port}" for n in self.nodes]
        self._cli("--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas), "--cluster-yes",
                  timeout=timeout)
        self.wait_healthy(timeout)
        return self

    def _cli(self, *args: str, timeout: float = 30.0) -> str:
        done = subprocess.run([str(self.cli), *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0 or "[ERR]" in done.stdout:
            raise LaunchError(f"redis-cli {' '.join(args[:2])} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def client(self, node: RedisServer) -> Any:
        """A plain (non-cluster) client of one node."""
        import redis

        return redis.Redis(host=self.host, port=node.port, socket_timeout=2)

    def topology(self) -> list[NodeState]:
        """``CLUSTER NODES`` as the first live node sees it."""
        node = next(n for n in self.nodes if n.running)
        with self.client(node) as c:
            return _parse_nodes(c.execute_command("CLUSTER", "NODES").decode())

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def master_of_slot(self, slot: int) -> RedisServer:
        """The running master that serves ``slot`` now."""
        for state in self.topology():
            if state.master and not state.failed and any(lo <= slot <= hi for lo, hi in state.slots):
                return self.node(state.port)
        raise LaunchError(f"no live master serves slot {slot}")

    def slot_owners(self) -> list[int | None]:
        """The port of the live master serving each of the 16384 slots (None: no live owner)."""
        owners: list[int | None] = [None] * 16384
        for state in self.topology():
            if state.master and not state.failed:
                for lo, hi in state.slots:
                    owners[lo:hi + 1] = [state.port] * (hi - lo + 1)
        return owners

    def primaries(self) -> list[RedisServer]:
        return [self.node(s.port) for s in self.topology() if s.master and not s.failed and s.slots]

    def _healthy(self) -> bool:
        running = [n for n in self.nodes if n.running]
        for node in running:
            with self.client(node) as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
                    raise Pending(f"node {node.port}: cluster not ok yet")
                if "cluster_slots_fail:0" not in info or "cluster_slots_pfail:0" not in info:
                    raise Pending(f"node {node.port}: some slots have a failed master")
                repl = c.info("replication")
                if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                    raise Pending(f"replica {node.port} not in sync with its master")
        if sum(s.master and not s.failed and bool(s.slots) for s in self.topology()) < self.masters:
            raise Pending("a master's slots are not served")
        return True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports all slots served and every replica in sync."""
        wait_ready(None, self._healthy, timeout, "the Redis Cluster", interval=0.1)

    def kill(self, node: RedisServer) -> None:
        """SIGKILL a node (a crash: no goodbye to the cluster)."""
        if node.child is not None:
            self.launcher.stop(node.child, grace=0, sig=signal.SIGKILL)
            node.child = None

    def reshard(self, source: RedisServer, target: RedisServer, slots: int, timeout: float = 120.0) -> None:
        """Move ``slots`` slots (with their keys, MIGRATE) from ``source`` to ``target``."""
        ids = {s.port: s.node_id for s in self.topology()}
        self._cli("--cluster", "reshard", f"{self.host}:{source.port}", "--cluster-from", ids[source.port],
                  "--cluster-to", ids[target.port], "--cluster-slots", str(slots), "--cluster-yes",
                  "--cluster-pipeline", "100", timeout=timeout)

    def flushall(self) -> None:
        """Empty every master (replicas follow)."""
        for node in self.primaries():
            with self.client(node) as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(launcher: Launcher, masters: int = 3, replicas: int = 1,
                        node_timeout_ms: int = LOCAL_NODE_TIMEOUT_MS, host: str = LOOPBACK,
                        timeout: float = 30.0) -> RedisClusterServer:
    """A running local Redis Cluster (see ``RedisClusterServer``); its URL is ``.url``."""
    started = time.monotonic()
    cluster = RedisClusterServer(launcher, masters, replicas, node_timeout_ms, host)
    try:
        cluster.start(timeout)
    except BaseException:
        cluster.stop()
        raise
    cluster.start_s = time.monotonic() - started
    return cluster


async def failover_run(cluster: RedisClusterServer, store: Any, user_ids: Sequence[str], item_ids: Sequence[str],
                       candidates: int, max_s: float = 30.0) -> dict[str, Any]:
    """A failover drill for a feature store (``RedisClusterOnlineStore``) on ``cluster``: SIGKILL a
    master (not the active pointer's) during a stream of reads, alternating a user whose keys live
    on it and one whose keys do not (candidates: items elsewhere), until the first kind reads again
    20 times in a row. ``error_window_s``: kill -> first success after the last failure; ``failed``,
    ``failed_other`` (users elsewhere), ``requests``; ``victim``: the killed node."""
    from redis.crc import key_slot

    from ctrserve.feature_store.errors import FeatureStoreError

    owner = cluster.slot_owners()
    vkeys = store.keys.version(await store.check_version())
    pointer_port = owner[key_slot(store.keys.active.encode())]
    victim = next(n for n in cluster.primaries() if n.port != pointer_port)
    on_victim = {u: owner[key_slot(vkeys.user(u).encode())] == victim.port for u in user_ids}
    classes = {"victim": [u for u in user_ids if on_victim[u]], "other": [u for u in user_ids if not on_victim[u]]}
    items = [i for i in item_ids if owner[key_slot(vkeys.item(i).encode())] != victim.port][:candidates]
    outcomes: list[tuple[float, str, bool]] = []
    killed = time.monotonic()
    cluster.kill(victim)
    streak, k = 0, 0
    while streak < 20 and time.monotonic() - killed < max_s:
        for kind, users in classes.items():
            start = time.monotonic() - killed
            try:
                await store.online_read(users[k % len(users)], items)
                ok = True
            except FeatureStoreError:
                ok = False
            outcomes.append((start, kind, ok))
            if kind == "victim":
                streak = streak + 1 if ok else 0
        k += 1
        await asyncio.sleep(0.01)
    last_failure = max((t for t, _, ok in outcomes if not ok), default=0.0)
    recovered = min((t for t, kind, ok in outcomes if ok and kind == "victim" and t > last_failure), default=None)
    return {"error_window_s": recovered, "failed": sum(not ok for _, _, ok in outcomes),
            "failed_other": sum(not ok for _, kind, ok in outcomes if kind == "other"), "requests": len(outcomes),
            "victim": victim}
