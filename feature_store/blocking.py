"""Blocking reads for a caller that runs a whole request on one thread without awaiting (the
gateway's inline execution): redis-py with hiredis on plain sockets, no event-loop round trips,
about half the client CPU of ``redis.asyncio`` (``ctrserve bench store``).

``BlockingPool`` hands out connections; ``RedisBlockingReader`` (the store's ``BlockingReader``)
plans a read through the store's current ``ReadView``, sends its MGET on a pooled connection and
returns a ``PendingRead`` that collects (or drains) the reply later. The socket timeout
(``timeout_ms``) bounds every blocking call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from .base import BlockingReader, PendingRead, RequestFeatures
from .config import RedisStoreConfig
from .errors import FeatureStoreError
from .reads import ReadPlan, ReadView
from .redis_errors import map_redis_error

ErrorMapper = Callable[[BaseException, ReadPlan], FeatureStoreError]


class BlockingPool:
    """Blocking connections, checked out for one read (send, then collect or drain the reply).

    Between reads a connection waits in an idle list and is handed out without the redis-py
    pool's per-checkout checks (connect, can-read poll, pid): every reply is read before a
    connection comes back (``checkin``), and a broken one goes back to the redis-py pool, which
    reconnects it. A forked child starts with no idle connections (it must not share its
    parent's sockets)."""

    def __init__(self, config: RedisStoreConfig):
        self._config = config
        #: connections per process: at ``busy == size`` a checkout waits (up to the pool timeout)
        self.size = config.pool_size
        self._client: redis.Redis | None = None  # created by the first checkout
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self._busy = 0  # checked out now (reads sent, replies not collected)
        self._busy_lock = threading.Lock()

    @property
    def busy(self) -> int:
        """Connections checked out now."""
        return self._busy if self._pid == os.getpid() else 0

    @property
    def idle(self) -> int:
        """Connections waiting for the next read."""
        return len(self._idle) if self._pid == os.getpid() else 0

    @property
    def saturated(self) -> bool:
        return self.busy >= self.size

    def _redis_pool(self) -> redis.BlockingConnectionPool:
        if self._client is None:
            cfg = self._config
            pool = redis.BlockingConnectionPool.from_url(cfg.effective_url(), **cfg.client_kwargs())
            self._client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
        return self._client.connection_pool

    def checkout(self) -> Any:
        """An idle connection, else one from the redis-py pool (which connects it; raises
        redis-py's errors when it cannot)."""
        if self._pid != os.getpid():
            self._idle, self._pid, self._busy = [], os.getpid(), 0
        try:
            conn = self._idle.pop()  # atomic: threads may share the pool
        except IndexError:
            conn = self._redis_pool().get_connection()
        with self._busy_lock:
            self._busy += 1
        return conn

    def checkin(self, conn: Any, broken: bool = False) -> None:
        """Give back a connection whose reply has been read (``broken``: its state is unknown)."""
        with self._busy_lock:
            self._busy -= 1
        if broken or self._client is None:  # broken, or the pool was closed meanwhile
            conn.disconnect()
            if self._client is not None:
                self._client.connection_pool.release(conn)
            return
        self._idle.append(conn)

    def close(self) -> None:
        """Disconnect every connection; one checked out now is disconnected at its checkin."""
        if self._client is None:
            return
        pool = self._client.connection_pool
        while self._idle:
            pool.release(self._idle.pop())
        self._client.close()
        pool.disconnect()
        self._client = None


class _PendingMget(PendingRead):
    """One MGET sent on a checked-out connection, the reply not yet read. The connection stays
    checked out until ``result()`` or ``cancel()``: its next bytes are this reply."""

    __slots__ = ("_conn", "_map_error", "_plan", "_pool")

    def __init__(self, pool: BlockingPool, plan: ReadPlan, map_error: ErrorMapper):
        self._pool, self._plan, self._map_error = pool, plan, map_error
        self._conn: Any = None

    def send(self) -> None:
        try:
            self._conn = self._pool.checkout()
        except (RedisError, OSError) as exc:
            raise self._map_error(exc, self._plan) from exc
        try:
            try:
                self._conn.send_command("MGET", *self._plan.keys)
            except RedisConnectionError:  # one immediate retry heals a connection broken by a server restart
                self._resend()
        except (RedisError, OSError) as exc:
            self._release()
            raise self._map_error(exc, self._plan) from exc

    def _resend(self) -> None:
        self._conn.disconnect()
        self._conn.send_command("MGET", *self._plan.keys)

    def _release(self, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.checkin(conn, broken)

    def result(self) -> RequestFeatures | None:
        if self._conn is None:
            raise RuntimeError("this read was already collected or cancelled")
        try:
            try:
                reply = self._conn.read_response()
            except RedisConnectionError:  # the server restarted since the send: send once more
                self._resend()
                reply = self._conn.read_response()
        except (RedisError, OSError) as exc:
            self._release(broken=True)
            raise self._map_error(exc, self._plan) from exc
        self._release()
        return self._plan.decode(reply)

    def cancel(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.read_response()  # the reply must leave the socket before the connection is reused
        except (RedisError, OSError):
            self._release(broken=True)
        else:
            self._release()


class RedisBlockingReader(BlockingReader):
    """The Redis store's ``BlockingReader``: reads under the view ``current_view()`` returns (None
    until the store has adopted a version, and again after it notices a flip)."""

    def __init__(self, pool: BlockingPool, current_view: Callable[[], ReadView | None], where: str, timeout_s: float):
        """``where``: the store, as error messages name it; ``timeout_s``: the pool's socket timeout."""
        self.pool = pool
        self.timeout_s = timeout_s
        self._current_view = current_view
        self._where = where

    @property
    def saturated(self) -> bool:
        return self.pool.saturated

    def map_error(self, exc: BaseException, plan: ReadPlan) -> FeatureStoreError:
        """The typed error for a blocking read that failed."""
        what = f"read user {plan.user_id!r} + {len(plan.item_ids)} items"
        return map_redis_error(exc, what, self._where, self.timeout_s)

    def begin(self, user_id: str, item_ids: Sequence[str]) -> PendingRead | None:
        view = self._current_view()
        if view is None:
            return None
        pending = _PendingMget(self.pool, view.plan(str(user_id), [str(i) for i in item_ids]), self.map_error)
        pending.send()
        return pending

    def close(self) -> None:
        self.pool.close()
