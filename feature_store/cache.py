"""In-process LRU + TTL cache of item values (validated bytes), with Prometheus metrics.

Items change rarely and are shared by many requests, so caching them spares Redis most of a
request's MGET. Staleness after an online ``put_item`` from another process is bounded by the
TTL; a flip of the active version clears the cache.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

# Process-wide (every store of the process adds to them). They live in prometheus-client's default
# registry; ``register_metrics`` adds them to another one, e.g. the gateway's /metrics registry.
ITEM_CACHE_LOOKUPS = Counter(
    "ctrserve_feature_store_item_cache_lookups", "Item-feature cache lookups by result", ["result"]
)
ITEM_CACHE_HIT_RATIO = Gauge(
    "ctrserve_feature_store_item_cache_hit_ratio", "Item-feature cache hits / lookups since start, all caches of "
    "the process"
)
_HITS = ITEM_CACHE_LOOKUPS.labels(result="hit")
_MISSES = ITEM_CACHE_LOOKUPS.labels(result="miss")
_TOTALS = [0, 0]  # hits, lookups: the gauge is the process-wide ratio, not the last cache's


def register_metrics(registry: CollectorRegistry) -> None:
    """Expose the item-cache metrics in ``registry`` as well (idempotent)."""
    for collector in (ITEM_CACHE_LOOKUPS, ITEM_CACHE_HIT_RATIO):
        with contextlib.suppress(ValueError):  # already registered there
            registry.register(collector)


class ItemCache:
    """``item_id -> (value, expiry)``; least recently used entries leave first when full."""

    def __init__(self, max_size: int, ttl_s: float):
        self.max_size, self.ttl_s = max_size, ttl_s
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get_many(self, ids: Sequence[str], now: float) -> list[bytes | None]:
        if not self.max_size:
            return [None] * len(ids)
        data = self._data
        out: list[bytes | None] = []
        hits = 0
        for item_id in ids:
            entry = data.get(item_id)
            if entry is not None and entry[1] > now:
                data.move_to_end(item_id)
                out.append(entry[0])
                hits += 1
            else:
                if entry is not None:
                    del data[item_id]
                out.append(None)
        self.hits += hits
        self.misses += len(ids) - hits
        _HITS.inc(hits)
        _MISSES.inc(len(ids) - hits)
        _TOTALS[0] += hits
        _TOTALS[1] += len(ids)
        ITEM_CACHE_HIT_RATIO.set(_TOTALS[0] / _TOTALS[1] if _TOTALS[1] else 0.0)
        return out

    def put(self, item_id: str, value: bytes, now: float) -> None:
        if not self.max_size:
            return
        self._data[item_id] = (value, now + self.ttl_s)
        self._data.move_to_end(item_id)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def discard(self, item_id: str) -> None:
        self._data.pop(item_id, None)

    def clear(self) -> None:
        self._data.clear()
