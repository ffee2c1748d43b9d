"""The impression log's writer stops on close even when a cancel would be lost: under Python 3.11
redis-py's send (``asyncio.wait_for``) can finish normally in the loop turn a cancel arrives,
which swallows it; a writer stopped by cancelling then waited for the next request forever and
the gateway's shutdown hung (seen as 600 s timeouts of in-process gateway tests)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from ctrserve.service.impressions import ImpressionLog
from ctrserve.service.metrics import Metrics
from ctrserve.service.routing import Route
from ctrserve.service.settings import FeedbackSettings

pytestmark = pytest.mark.quick

ROUTE = Route("default", "default", "deepfm", 1, 0)


class SwallowingStore:
    """A write that takes a few loop turns and, like the send under Python 3.11's ``wait_for``,
    completes even when its task is cancelled meanwhile."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.writing = asyncio.Event()
        self.swallowed = 0

    async def write_impressions(self, entries: list[Any], arms: dict, timeout_s: float) -> None:
        self.writing.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1
        self.written += [e.request_id for e in entries]


def _add(log: ImpressionLog, rid: str) -> None:
    log.add(rid, "u1", ROUTE, ["a", "b"], np.array([0.1, 0.2], dtype=np.float32))


async def test_close_stops_the_writer_and_writes_everything_even_if_a_cancel_is_swallowed() -> None:
    store = SwallowingStore()
    log = ImpressionLog(store, FeedbackSettings(flush_interval_ms=1), Metrics())  # type: ignore[arg-type]
    log.start()
    _add(log, "r1")
    await store.writing.wait()  # the writer is inside a write
    _add(log, "r2")  # queued during the write: the writer is woken again
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    # the bound: a close that hung would be cancelled by wait_for, whose cancel reaches the writer
    await asyncio.wait_for(log.close(), 5)
    assert loop.time() - t0 < 1, f"close took {loop.time() - t0:.1f} s: it waited for a writer that missed the stop"
    assert log._task is not None and log._task.done()
    assert store.written == ["r1", "r2"]


async def test_close_of_an_idle_writer_returns_at_once() -> None:
    store = SwallowingStore()
    log = ImpressionLog(store, FeedbackSettings(), Metrics())  # type: ignore[arg-type]
    log.start()
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(log.close(), 5)
    assert loop.time() - t0 < 0.5 and store.written == []
