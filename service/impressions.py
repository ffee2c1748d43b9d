"""The impression log's writer: scored requests are queued in memory on the hot path (no Redis
call before the response) and written by a background task in one pipelined round trip per
flush (feature_store/feedback.py): each request's join hash, its log entry, its arm's counters.

A flush starts ``flush_interval_ms`` after the first request queued since the last one, so
requests that arrive together share a round trip. ``POST /v1/events`` flushes first, so that an
event for a request this process just answered finds it. When Redis is down the batch is
dropped and counted (``ctrserve_impressions_dropped_total``): the log never holds up scoring.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

import numpy as np
import orjson

from ctrserve.feature_store.errors import FeatureStoreError
from ctrserve.feature_store.feedback import ArmIncrements, FeedbackStore, Impression

from .metrics import Metrics
from .outcomes import score_bins
from .routing import Route
from .settings import FeedbackSettings

log = logging.getLogger("ctrserve.service.impressions")

#: (request id, time in ms, user id, route, item ids, scores, model inputs)
Queued = tuple[str, int, str, Route, Sequence[str], np.ndarray, dict[str, np.ndarray] | None]


class ImpressionLog:
    def __init__(self, store: FeedbackStore, settings: FeedbackSettings, metrics: Metrics):
        self.store, self.settings, self.metrics = store, settings, metrics
        self._queue: list[Queued] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._timeout_s = max(1.0, settings.flush_interval_ms / 1000 * 10)

    def add(self, request_id: str, user_id: str, route: Route, item_ids: Sequence[str], scores: np.ndarray,
            inputs: dict[str, np.ndarray] | None = None) -> None:
        """Queue one scored request (sampled at ``sample_rate``): no I/O, a list append. ``inputs``:
        the model inputs, logged (``log_inputs``) so that the export can retrain on what was served."""
        rate = self.settings.sample_rate
        if rate < 1.0 and random.random() >= rate:
            return
        if len(self._queue) >= self.settings.queue_max:
            self.metrics.impressions_dropped.inc()
            return
        self._queue.append((request_id, int(time.time() * 1000), user_id, route, item_ids, scores,
                            inputs if self.settings.log_inputs else None))
        self._wake.set()

    def start(self) -> None:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="impression-log")

    async def close(self) -> None:
        """Stop the writer and write what is queued. The writer is asked to stop rather than
        cancelled: a cancel can be lost in redis-py's send (Python 3.11's ``asyncio.wait_for``
        returns the result of a send that finished in the same loop turn as the cancel), and a
        writer that missed it then waited for the next request forever, holding up shutdown."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            # a write in progress ends within its timeout; the cancel is a backstop only
            _, pending = await asyncio.wait({self._task}, timeout=self._timeout_s + 1)
            for task in pending:
                log.warning("impression log writer did not stop; cancelling it")
                task.cancel()
        await self.flush()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if not self._closing:  # requests arriving together share a round trip
                await asyncio.sleep(self.settings.flush_interval_ms / 1000)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        """Write everything queued; returns how many requests were written (0 if dropped)."""
        async with self._lock:
            batch, self._queue = self._queue, []
            if not batch:
                return 0
            entries, arms = _prepare(batch)
            t0 = time.perf_counter()
            try:
                await self.store.write_impressions(entries, arms, self._timeout_s)
            except FeatureStoreError as exc:
                self.metrics.impressions_dropped.inc(len(batch))
                log.warning("impression log batch dropped", extra={"requests": len(batch), "reason": str(exc)})
                return 0
            self.metrics.log_flush.observe(time.perf_counter() - t0)
            self.metrics.impressions_logged.inc(len(batch))
            return len(batch)


def _prepare(batch: list[Queued]) -> tuple[list[Impression], dict[tuple[str, str], ArmIncrements]]:
    """The log entries and each arm's counter increments of one flush."""
    entries, arms = [], {}
    for rid, ts_ms, user, route, items, scores, inputs in batch:
        bins = score_bins(scores)
        entries.append(Impression(rid, ts_ms, user, route.experiment, route.arm, route.model, route.version,
                                  list(items), [float(s) for s in scores], bins.tolist(),
                                  None if inputs is None else encode_inputs(inputs)))
        inc = arms.setdefault((route.experiment, route.arm), ArmIncrements())
        inc.requests += 1
        inc.impressions += len(items)
        inc.sum_predicted += float(np.sum(scores, dtype=np.float64))
        values, counts = np.unique(bins, return_counts=True)
        for b, n in zip(values.tolist(), counts.tolist(), strict=True):
            inc.bins[b] = inc.bins.get(b, 0) + n
    return entries, arms


def encode_inputs(inputs: dict[str, np.ndarray]) -> bytes:
    """Model inputs as one JSON header line (name, dtype, shape of each) and the arrays' bytes:
    a tenth of ``np.savez``'s time (the writer runs on the event loop); ``decode_inputs`` reverses it."""
    arrays = {name: np.ascontiguousarray(a) for name, a in inputs.items()}
    header = orjson.dumps([[name, a.dtype.str, a.shape] for name, a in arrays.items()])
    return b"".join([header, b"\n", *(a.tobytes() for a in arrays.values())])


def decode_inputs(blob: bytes) -> dict[str, np.ndarray]:
    head, _, body = blob.partition(b"\n")
    out, offset = {}, 0
    for name, dtype, shape in orjson.loads(head):
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        out[name] = np.frombuffer(body, dt, count=int(np.prod(shape)), offset=offset).reshape(shape)
        offset += n
    return out
