"""When a request's store read, assembly and inference run inline on the event loop, and when
inference goes to the model version's own threads (``CTRSERVE_BACKEND_EXECUTION``).

- ``thread``: always the threads; the event loop keeps reading other requests meanwhile.
- ``inline``: always inline (embedded runtimes only): no thread hand-offs, one request at a time
  per worker process.
- ``auto`` (default): inline while a request is the only one being scored, the threads when
  others are scored with it — and for ``auto_overlap_s`` after requests last overlapped, so that
  a request arriving meanwhile does not wait behind one holding the event loop while an
  inference thread idles. A sequential client never overlaps and stays inline.

The measurements behind each rule are in docs/decisions.md ("Inline execution", "`auto`
execution becomes the default", "`auto` leaves the event loop free once requests overlap").
"""

from __future__ import annotations

import asyncio
import time

from .backends import Backend
from .settings import BackendSettings


class ExecutionPolicy:
    """Counts the requests being scored (``async with policy:`` around each) and decides, per
    request, inline or thread."""

    def __init__(self, settings: BackendSettings):
        self.settings = settings  # read per request: tests and benchmarks switch modes on a live gateway
        self.scoring = 0  # requests inside ``scoring()``: auto's load signal
        self._overlap_until = 0.0

    @property
    def reads_ahead(self) -> bool:
        """Whether the store read may be sent before validation and collected without awaiting
        (inline and auto; ``thread`` always awaits the read)."""
        return self.settings.execution != "thread"

    async def __aenter__(self) -> None:
        """Enter around one request's scoring (``async with policy:``). Under ``auto`` it first
        yields one loop turn: requests the server has already read register before this one
        decides (a request running inline would otherwise finish before they start)."""
        self.scoring += 1
        if self.settings.execution == "auto":
            try:
                await asyncio.sleep(0)
            except BaseException:
                self.scoring -= 1
                raise

    async def __aexit__(self, *exc: object) -> None:
        self.scoring -= 1

    def inline(self, backend: Backend) -> bool:
        """Run this request inline? Only backends that can (``Backend.inline``)."""
        execution = self.settings.execution
        if not backend.inline or execution == "thread":
            return False
        if execution == "inline":
            return True
        now = time.perf_counter()
        if self.scoring > 1:
            self._overlap_until = now + self.settings.auto_overlap_s
        return self.scoring == 1 and now >= self._overlap_until
