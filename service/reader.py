"""How one request's stored features are read: the gateway's strategy over the feature store's
small interface (``OnlineStore.online_read`` and its optional ``BlockingReader``).

- **early**: sent as soon as the body is decoded, before it is validated and routed, on the
  store's blocking reader; collected (without awaiting) by the scoring that follows. Only when
  the execution may run inline (``ExecutionPolicy.reads_ahead``), the store has a blocking
  reader with a connection free, and the whole store budget covers its socket timeout.
- **blocking**: an inline request without an early read reads on the blocking reader too.
- **async**: everything else awaits ``online_read`` within the remaining store budget (also the
  fallback when a blocking read answers "the active version changed": adopting the new one
  checks its schema through the async client).
- **degraded**: when the store fails or runs out of budget, ``CTRSERVE_STORE_FAILURE=degrade``
  scores with cold-start features (``flags.degraded``); ``fail`` answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ctrserve.feature_store.base import BlockingReader, OnlineStore, PendingRead, RequestFeatures
from ctrserve.feature_store.errors import FeatureStoreError, StoreNotLoaded

from .assemble import Assembler
from .errors import GatewayError
from .metrics import Metrics
from .routing import Overrides, Route
from .settings import StoreSettings

if TYPE_CHECKING:
    from .gateway import Table

log = logging.getLogger("ctrserve.service")


@dataclass(frozen=True)
class EarlyRead:
    """A store read sent before validation, with what it was sent for; scoring collects it when
    the validated request is the same (same ids, overrides and routing table), else ignores it.
    The caller always calls ``cancel()`` after scoring (a no-op once collected)."""

    table: Table
    route: Route
    sent_for: tuple[str, list[str], Overrides]  # user id, item ids, overrides
    pending: PendingRead

    def matches(self, table: Table, user_id: str, item_ids: list[str], overrides: Overrides) -> bool:
        return self.table is table and self.sent_for == (user_id, item_ids, overrides)

    def cancel(self) -> None:
        self.pending.cancel()


class FeatureReader:
    def __init__(self, settings: StoreSettings, metrics: Metrics):
        self.failure = settings.failure
        #: the whole store budget (settings keep it below the request deadline)
        self.budget_s = settings.timeout_ms / 1000
        self.early_reads = settings.early_read
        self.metrics = metrics

    def begin(self, store: OnlineStore, user_id: str, item_ids: list[str]) -> PendingRead | None:
        """Send an early read, best effort: None when it cannot be sent without waiting."""
        blocking = _blocking_within(store, self.budget_s)
        if blocking is None or blocking.saturated:
            return None
        try:
            return blocking.begin(user_id, item_ids)
        except FeatureStoreError:
            return None  # scoring reads again and answers the failure

    async def read(self, store: OnlineStore, assembler: Assembler, user_id: str, item_ids: list[str],
                   deadline: float, inline: bool, early: PendingRead | None) -> tuple[RequestFeatures, dict[str, Any]]:
        """The stored features and the response flags they raise (degraded, user or items missing)."""
        budget = min(self.budget_s, deadline - time.perf_counter())
        try:
            stored = None
            if early is not None and budget > 0:
                stored = early.result()
            elif inline and budget > 0 and (blocking := _blocking_within(store, budget)) is not None:
                stored = blocking.read(user_id, item_ids)
            if stored is None:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the read in one more Task
                async with asyncio.timeout(max(budget, 0.0)):
                    stored = await store.online_read(user_id, item_ids)
        except (FeatureStoreError, TimeoutError) as exc:
            return self._degraded(exc, budget, assembler, user_id, item_ids)
        return stored, self._flags(stored, item_ids)

    def _degraded(self, exc: Exception, budget: float, assembler: Assembler, user_id: str,
                  item_ids: list[str]) -> tuple[RequestFeatures, dict[str, Any]]:
        reason = str(exc) or f"no answer within {budget * 1000:.0f} ms"
        self.metrics.store_errors.labels(type(exc).__name__).inc()
        if self.failure != "degrade":
            hint = "nothing is bulk-loaded" if isinstance(exc, StoreNotLoaded) else "Redis is down or slow"
            raise GatewayError(503, "store_unavailable", f"feature store unavailable ({hint}): {reason}")
        log.warning("store failed, scoring with cold-start features", extra={"reason": reason})
        self.metrics.degraded.inc()
        return assembler.cold_start(user_id, item_ids), {"degraded": True}

    def _flags(self, stored: RequestFeatures, item_ids: Sequence[str]) -> dict[str, Any]:
        m, b = self.metrics, len(item_ids)
        m.child(m.store_lookups, "user", "miss" if stored.user_missing else "hit").inc()
        missing = len(stored.missing_items)
        if b - missing:
            m.child(m.store_lookups, "item", "hit").inc(b - missing)
        if missing:
            m.child(m.store_lookups, "item", "miss").inc(missing)
        hits = int(stored.item_cache_hits or 0)
        if hits:
            m.child(m.item_cache, "hit").inc(hits)
        if b - hits:
            m.child(m.item_cache, "miss").inc(b - hits)
        flags: dict[str, Any] = {}
        if stored.user_missing:
            flags["user_missing"] = True
        if missing:
            flags["missing_items"] = [item_ids[i] for i in np.asarray(stored.missing_items).tolist()]
        return flags


def _blocking_within(store: OnlineStore, budget: float) -> BlockingReader | None:
    """The store's blocking reader, when its socket timeout fits ``budget`` (a longer one would
    let a blocking read overrun the budget: such a read is awaited under the budget instead)."""
    blocking = store.blocking_reader()
    return blocking if blocking is not None and budget >= blocking.timeout_s - 1e-6 else None
