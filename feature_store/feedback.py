"""The closed loop's Redis side: the impression log, the event join and the outcomes per arm.

Key layout and the event script: keys.py (``FeedbackKeys``, ``LUA_EVENT``). Everything lives in
Redis, so several gateway replicas log to one stream, join each other's impressions and agree
on the outcomes. Writes are pipelined: one round trip per flushed batch of impressions and one
per batch of events (plus one read of the requests the batch names).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .config import RedisStoreConfig
from .keys import LUA_EVENT, FeedbackKeys
from .redis_errors import map_redis_error

EVENT_TYPES = ("click", "impression", "conversion")
#: what the event script answers for one event
RESULTS = ("accepted", "duplicate", "unknown_request", "unknown_item")


@dataclass
class Impression:
    """One scored request as the log keeps it. ``bins``: each score's histogram bin."""

    request_id: str
    ts_ms: int
    user_id: str
    experiment: str
    arm: str
    model: str
    version: int
    item_ids: list[str]
    scores: list[float]
    bins: list[int]
    #: the model inputs as an ``.npz`` (None: not logged)
    inputs: bytes | None = None


@dataclass
class ArmIncrements:
    """What one flush adds to an arm's outcome hash."""

    requests: int = 0
    impressions: int = 0
    sum_predicted: float = 0.0
    bins: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    event_id: str
    request_id: str
    item_id: str
    type: str
    ts: int


@dataclass(frozen=True)
class RequestInfo:
    """What an event needs to know about its request before the join: the user and the model."""

    user_id: str
    model: str
    version: int


class FeedbackStore:
    """The loop's Redis client (its own small pool beside the feature stores')."""

    def __init__(self, config: RedisStoreConfig, request_ttl_s: int, log_max_len: int):
        self.config = config
        self.keys = FeedbackKeys(config.key_prefix)
        self.request_ttl_s, self.log_max_len = request_ttl_s, log_max_len
        # the loop is off the scoring path: a flush of hundreds of requests or a batch of events may
        # take longer than a feature read's budget without anything waiting on it, so at least 1 s
        self._timeout_s = max(config.timeout_ms / 1000, 1.0)
        kwargs = {**config.client_kwargs(), "socket_timeout": self._timeout_s, "timeout": self._timeout_s}
        self._pool = aioredis.BlockingConnectionPool.from_url(config.effective_url(), **kwargs)
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._event = self._client.register_script(LUA_EVENT)
        self._where = f"redis {config.url} ({self.keys.base})"

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()

    async def _guarded(self, coro: Any, what: str, timeout_s: float | None = None) -> Any:
        timeout_s = timeout_s or self._timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await coro
        except (RedisError, TimeoutError, OSError) as exc:
            raise map_redis_error(exc, what, self._where, timeout_s) from exc

    # -- impressions -------------------------------------------------------------------------
    async def write_impressions(self, entries: Sequence[Impression],
                                arms: dict[tuple[str, str], ArmIncrements], timeout_s: float) -> None:
        """One pipeline: each request's hash (with TTL) and log entry, each arm's increments."""
        k, pipe = self.keys, self._client.pipeline(transaction=False)
        for e in entries:
            key = k.request(e.request_id)
            mapping: dict[str, Any] = {"u": e.user_id, "e": e.experiment, "a": e.arm, "m": e.model,
                                       "v": e.version, "t": e.ts_ms}
            mapping.update({f"s:{item}": b for item, b in zip(e.item_ids, e.bins, strict=True)})
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.request_ttl_s)
            entry: dict[str, Any] = {
                "request_id": e.request_id, "ts": e.ts_ms, "user_id": e.user_id, "arm": e.arm, "model": e.model,
                "version": e.version, "items": orjson.dumps(e.item_ids), "scores": orjson.dumps(e.scores)}
            if e.inputs is not None:
                entry["inputs"] = e.inputs
            pipe.xadd(k.log(e.experiment), entry, maxlen=self.log_max_len, approximate=True)
        for (experiment, arm), inc in arms.items():
            out = k.outcomes(experiment, arm)
            pipe.hincrby(out, "requests", inc.requests)
            pipe.hincrby(out, "impressions", inc.impressions)
            pipe.hincrbyfloat(out, "sum_predicted", inc.sum_predicted)
            for b, n in inc.bins.items():
                pipe.hincrby(out, f"h:{b}", n)
        await self._guarded(pipe.execute(), f"log {len(entries)} scored requests", timeout_s)

    # -- events ------------------------------------------------------------------------------
    async def requests(self, request_ids: Sequence[str]) -> list[RequestInfo | None]:
        """The user and model of each request (None: unknown or expired)."""
        pipe = self._client.pipeline(transaction=False)
        for rid in request_ids:
            pipe.hmget(self.keys.request(rid), "u", "m", "v")
        rows = await self._guarded(pipe.execute(), f"read {len(request_ids)} logged requests")
        return [RequestInfo(u.decode(), m.decode(), int(v)) if u is not None else None for u, m, v in rows]

    async def record_events(self, events: Sequence[Event],
                            appends: Sequence[tuple[str, list[Any]] | None]) -> list[str]:
        """Run the event script for each event (one pipeline); ``appends[i]``: the sequence append
        a click should make (``RedisOnlineStore.click_append``), or None. Returns each event's
        result (``RESULTS``)."""
        k, pipe = self.keys, self._client.pipeline(transaction=False)
        for ev, append in zip(events, appends, strict=True):
            active, extra = append if append is not None else ("", [])
            args = [k.base, ev.request_id, ev.event_id, ev.item_id, ev.type, ev.ts, self.request_ttl_s,
                    self.log_max_len, *extra]
            await self._event(keys=[k.request(ev.request_id), k.event(ev.request_id, ev.event_id), k.totals,
                              active or k.totals], args=args, client=pipe)
        results = await self._guarded(pipe.execute(raise_on_error=False), f"record {len(events)} events")
        for r in results:
            if isinstance(r, Exception):
                raise map_redis_error(r, "record events", self._where, self._timeout_s)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in results]

    # -- outcomes ----------------------------------------------------------------------------
    async def outcomes(self, experiment: str, arms: Sequence[str]) -> dict[str, dict[str, float]]:
        """Each arm's outcome hash as numbers (empty for an arm nothing was logged for)."""
        pipe = self._client.pipeline(transaction=False)
        for arm in arms:
            pipe.hgetall(self.keys.outcomes(experiment, arm))
        rows = await self._guarded(pipe.execute(), f"read the outcomes of {experiment!r}")
        return {arm: {key.decode(): float(value) for key, value in row.items()} for arm, row in zip(arms, rows,
                                                                                                   strict=True)}

    async def totals(self) -> dict[str, int]:
        row = await self._guarded(self._client.hgetall(self.keys.totals), "read the event totals")
        return {key.decode(): int(value) for key, value in row.items()}

    # -- export ------------------------------------------------------------------------------
    async def stream(self, key: str, batch: int = 2000) -> AsyncIterator[dict[str, Any]]:
        """Every entry of a stream, oldest first, as ``{field: value}`` plus its ``id`` (text, except
        the ``inputs`` bytes)."""
        start = "-"
        while True:
            rows = await self._guarded(self._client.xrange(key, start, "+", count=batch), f"read {key}",
                                       self.config.bulk_timeout_ms / 1000)
            for entry_id, fields in rows:
                yield {"id": entry_id.decode(), **{f.decode(): v if f == b"inputs" else v.decode()
                                                   for f, v in fields.items()}}
            if len(rows) < batch:
                return
            start = "(" + rows[-1][0].decode()

