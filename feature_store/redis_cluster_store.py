"""Redis Cluster backend: the Redis store (redis_store.py) on redis-py's asyncio cluster client.

Selected by a ``redis+cluster://host:port`` URL (``backends.open_store``). What differs from one node:

- **Keys** are hash-tagged (keys.py): a user's profile and sequences share the slot of
  ``{u:<user_id>}``; items spread, each in the slot of ``{i:<item_id>}``.
- **A read** is ``GET`` of the active pointer, one ``MGET`` of the user's keys (one slot) and a
  ``GET`` per uncached item, grouped by the node redis-py's slot map names and sent as one
  pipeline per node, all nodes in parallel, on the client's own node connections. Any error reply
  (MOVED/ASK during a slot migration, TRYAGAIN) or connection error sends the failed commands
  again, one at a time, through redis-py's cluster client, which follows the redirects and
  re-reads the slot map. (The same read through redis-py's cluster pipeline took about 4x as long:
  it resolves a routing policy and a slot per command.)
  The pointer comes back with the values, so a flip is noticed at once, as on one node; with
  ``pointer_check_ms`` it travels with at most one read per interval (a flip is then seen within
  the interval, and the pointer's node is not asked once per request).
- **Online writes** read the pointer, then write the versioned key in the user's (or item's) slot:
  the append is one Lua script on that slot (atomic per user). A write that races a flip (one round
  trip wide) lands in the outgoing version and goes with it, as do events appended between a bulk
  snapshot and its flip.
- **Garbage collection** scans every master.
- **No blocking reader** (``blocking_reader()`` is None): the gateway awaits ``online_read``.

``require_full_coverage=False``: while a dead master's replica is not yet promoted, reads of the
other masters' slots go on (docs/deploy.md, "Redis Cluster").
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import hiredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .keys import LUA_APPEND_AT, LUA_FLIP
from .reads import ReadPlan
from .redis_store import SCAN_BATCH, RedisOnlineStore


class _NodeBatch:
    """One node's share of a read: the positions of its commands and, once sent, the connection
    whose next replies are theirs. ``failed``: positions to send again through redis-py (an error
    reply such as MOVED/ASK/TRYAGAIN, or every one of them when the connection failed)."""

    __slots__ = ("conn", "failed", "node", "positions")

    def __init__(self, node: ClusterNode):
        self.node, self.positions = node, []
        self.conn: Any = None
        self.failed: list[int] = []

    async def send(self, commands: list[tuple[str, ...]]) -> None:
        try:
            self.conn = self.node.acquire_connection()
            # hiredis packs in C (redis-py's asyncio packer costs ~4 us per command)
            await self.conn.send_packed_command(b"".join([hiredis.pack_command(commands[p]) for p in self.positions]))
        except (RedisConnectionError, RedisTimeoutError, OSError):  # incl. a full pool
            await self.release(broken=True)
            self.failed = self.positions

    async def collect(self, replies: list[Any]) -> None:
        if self.conn is None:
            return
        try:
            for p in self.positions:
                try:  # the caller's asyncio.timeout bounds the reads: no per-reply timeout (~15 us each)
                    replies[p] = await self.conn.read_response(timeout=math.inf)
                except ResponseError:
                    self.failed.append(p)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await self.release(broken=True)
            self.failed = self.positions
        else:
            await self.release(broken=False)

    async def release(self, broken: bool = True) -> None:
        """Give the connection back; ``broken`` (or replies left unread: a cancelled read) closes it."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if broken:
                await conn.disconnect()
            self.node.release(conn)


class RedisClusterOnlineStore(RedisOnlineStore):
    """The Redis store on a Redis Cluster. Create one per process and reuse it."""

    tagged = True
    SCRIPTS: ClassVar[dict[str, str]] = {"append": LUA_APPEND_AT, "flip": LUA_FLIP}

    _slot_map_read = False
    _pointer_seen = -math.inf  # monotonic time of the last read whose pointer matched the adopted version

    @property
    def _pointer_every_s(self) -> float:
        return self.config.pointer_check_ms / 1000

    def _connect(self) -> Any:
        cfg = self.config
        # no retry: a connection error fails the call at once (the gateway answers 503 or degraded)
        # and marks the slot map for a refresh before the next call. redis-py's retry would first
        # close every node connection (other requests' too) and sleep 250 ms.
        return RedisCluster.from_url(cfg.effective_url(), require_full_coverage=False, retry=Retry(NoBackoff(), 0),
                                     **cfg.cluster_kwargs())

    async def close(self) -> None:
        await self._client.aclose()

    async def _guarded(self, coro: Any, timeout_s: float, what: str) -> Any:
        """The first call discovers the cluster (slot map, node connections: several round trips)
        within ``connect_timeout_ms`` on top of its own budget; later refreshes happen when a
        command fails (``_fetch``), not before every call."""
        if not self._slot_map_read:
            try:
                await super()._guarded(self._client.initialize(), self.config.connect_timeout_ms / 1000 + timeout_s,
                                       f"discover the cluster to {what}")
            except BaseException:
                (getattr(coro, "close", None) or coro.cancel)()  # a coroutine never awaited, or a gather
                raise
            self._slot_map_read = True
        return await super()._guarded(coro, timeout_s, what)

    def blocking_reader(self) -> None:  # type: ignore[override]
        """None: reads on a cluster go through ``online_read``."""
        return None

    async def _fetch(self, plan: ReadPlan) -> list[bytes | None]:
        """Pointer, user keys (one MGET, one slot) and items in one pipeline per node, in parallel."""
        keys, n_user = plan.keys, plan.user_key_count
        commands = [("GET", keys[0]), ("MGET", *keys[1:1 + n_user]), *(("GET", k) for k in keys[1 + n_user:])]
        now = time.monotonic()
        with_pointer = now - self._pointer_seen >= self._pointer_every_s
        client = self._client
        batches: dict[str, _NodeBatch] = {}
        for pos, command in enumerate(commands if with_pointer else commands[1:], start=0 if with_pointer else 1):
            node = client.get_node_from_key(command[1])
            batch = batches.get(node.name) or batches.setdefault(node.name, _NodeBatch(node))
            batch.positions.append(pos)
        replies: list[Any] = [None] * len(commands)
        replies[0] = plan.view.version_bytes  # what the pointer said within the last pointer_check_ms
        try:  # every node's pipeline leaves before the first reply is awaited: the nodes work in parallel
            for batch in batches.values():
                await batch.send(commands)
            for batch in batches.values():
                await batch.collect(replies)
        finally:
            for batch in batches.values():
                await batch.release()  # only after a cancellation: replies unread
        # one at a time through redis-py, which follows MOVED/ASK, retries TRYAGAIN and, after a
        # connection error, fails at once and re-reads the slot map before its next command
        for pos in (p for batch in batches.values() for p in batch.failed):
            replies[pos] = await client.execute_command(*commands[pos])
        if with_pointer and replies[0] == plan.view.version_bytes:
            self._pointer_seen = now
        return [replies[0], *replies[1], *replies[2:]]

    def _queue_values(self, pipe: Any, values: dict[str, bytes]) -> None:
        """One SET per key: an MSET may not span slots."""
        for key, value in values.items():
            pipe.set(key, value)

    def _scan_versioned(self) -> AsyncIterator[bytes]:
        """Every versioned key on every master."""
        return self._client.scan_iter(match=self.keys.scan_pattern, count=SCAN_BATCH,
                                      target_nodes=RedisCluster.PRIMARIES)

    async def _under_active(self, script: str, args: list[Any], what: str) -> Any:
        """Read the active pointer (creating an empty version if there is none), then run the write
        on the versioned key alone: its slot is the user's or the item's, not the pointer's."""
        version = await self.active_version() or await self.ensure_active()
        key = self.keys.at(version, args[1])
        write = self._client.set(key, args[2]) if script == "set" else self._scripts[script](keys=[key], args=args)
        return await self._guarded(write, self._timeout_s, what)
