"""Cross-request batching for embedded ONNX Runtime: requests for one model version that arrive
together run as one call of the multi-user graph (``ctrserve export --grouped``, export/grouped.py).

Each ``infer`` validates its own inputs against the manifest (so a bad request fails alone, never
its batch-mates) and joins the version's queue. A batch leaves the queue

- at once when no call of this version is running (a lone request waits for nothing);
- when the queued requests hold ``max_candidates`` candidates;
- when the oldest has waited ``max_wait_s`` while another call runs;
- when a running call finishes and requests are queued (they waited for it anyway).

The batch's user-side inputs are stacked ``[R, ...]``, its candidate-side inputs concatenated
``[B, ...]`` with ``user_index [B]``; the scores are split back per request, in order. A request
whose deadline passes while queued is answered 504 and left out of the call. If a batched call
fails, each of its requests is run alone, so the failure lands only on the requests that cause it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from ctrserve.contract.manifest import Manifest

from . import Backend, BackendError, BackendTimeout, BatchRide, batch_ride, check_scores
from .onnxruntime import OnnxRuntimeBackend


@dataclass
class _Queued:
    inputs: dict[str, np.ndarray]
    candidates: int
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    ride: BatchRide | None = None


@dataclass
class BatchStats:
    """Running totals for metrics: calls, requests and candidates batched, queue wait."""

    calls: int = 0
    requests: int = 0
    candidates: int = 0
    wait_s: float = 0.0
    #: (requests, queue wait of the oldest in seconds) of the last call
    last: tuple[int, float] = (0, 0.0)


class BatchingBackend(Backend):
    """One model version's multi-user graph behind a queue; ``infer`` has the single-request
    contract (user inputs ``[1, ...]``, candidate inputs ``[B, ...]``)."""

    kind = "onnxruntime"
    inline = False  # requests must meet in the queue: never on the caller's thread

    def __init__(self, manifest: Manifest, grouped: OnnxRuntimeBackend, max_candidates: int, max_wait_s: float,
                 single: OnnxRuntimeBackend | None = None):
        """``single``: the single-user graph, for calls that hold one request (the multi-user graph
        gathers the user's tensors to every candidate, the single-user one uses them once)."""
        super().__init__(manifest.name, manifest.version)
        self.single = single
        if manifest.grouped is None:
            raise ValueError(f"{manifest.name} v{manifest.version} was exported without the multi-user graph "
                             "(ctrserve export --grouped)")
        self.grouped = grouped
        self.index_input = manifest.grouped.index_input
        self.specs = {t.name: t for t in manifest.inputs}
        self.user_inputs = [t.name for t in manifest.inputs if t.side == "user"]
        self.max_candidates = max_candidates
        self.max_wait_s = max_wait_s
        self.slots = grouped.pool.threads  # calls that may run at once
        self.running = 0
        self.stats = BatchStats()
        self._queue: list[_Queued] = []
        self._queued_candidates = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def provider(self) -> str:  # type: ignore[override]
        return self.grouped.provider

    async def start(self) -> None:
        await self.grouped.start()
        if self.single is not None:
            await self.single.start()

    async def ready(self) -> bool:
        return await self.grouped.ready() and (self.single is None or await self.single.ready())

    async def close(self) -> None:
        await self.grouped.close()
        if self.single is not None:
            await self.single.close()

    def check(self, inputs: dict[str, np.ndarray]) -> int:
        """The request's candidate count, after checking names, dtypes and shapes (before it joins
        a batch: a malformed request must fail alone)."""
        if set(inputs) != set(self.specs):
            raise BackendError(f"{self.model} v{self.version}: inputs {sorted(inputs)} are not {sorted(self.specs)}")
        b = None
        for name, spec in self.specs.items():
            arr = inputs[name]
            fixed = [(i, d) for i, d in enumerate(spec.shape) if i > 0 and d > 0]
            if arr.dtype != np.dtype(spec.dtype) or arr.ndim != len(spec.shape) or \
                    any(arr.shape[i] != d for i, d in fixed):
                raise BackendError(f"{self.model} v{self.version}: input {name!r} is {arr.dtype} {list(arr.shape)}, "
                                   f"the model takes {spec.dtype} {spec.shape}")
            lead = int(arr.shape[0])
            if spec.side == "user" and lead != 1:
                raise BackendError(f"{self.model} v{self.version}: user input {name!r} has batch {lead}, not 1")
            if spec.side == "candidate":
                if b is not None and lead != b:
                    raise BackendError(f"{self.model} v{self.version}: candidate inputs disagree on B ({b}, {lead})")
                b = lead
        return int(b or 0)

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> np.ndarray:
        b = self.check(inputs)
        item = _Queued(inputs, b, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._queued_candidates += b
        self._kick()
        try:
            async with asyncio.timeout(timeout):
                scores = await item.future
        except TimeoutError:
            raise BackendTimeout(f"{self.model} v{self.version}: inference exceeded {timeout * 1000:.0f} ms "
                                 "(queued and computing)") from None
        batch_ride.set(item.ride)
        return scores

    # -- the queue ---------------------------------------------------------------------------
    def _kick(self) -> None:
        """Start a call if the rules above say so, else make sure the wait timer runs."""
        while self._queue and self.running < self.slots:
            oldest = time.perf_counter() - self._queue[0].enqueued
            if self.running and self._queued_candidates < self.max_candidates and oldest < self.max_wait_s:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(self.max_wait_s - oldest, self._on_timer)
                return
            self._dispatch(self._take())

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _take(self) -> list[_Queued]:
        batch: list[_Queued] = []
        total = 0
        while self._queue and (not batch or total + self._queue[0].candidates <= self.max_candidates):
            item = self._queue.pop(0)
            self._queued_candidates -= item.candidates
            if item.future.done():  # its deadline passed while queued
                continue
            batch.append(item)
            total += item.candidates
        return batch

    def _dispatch(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.running += 1
        now = time.perf_counter()
        for item in batch:
            item.ride = BatchRide(len(batch), now - item.enqueued)
        wait = now - batch[0].enqueued
        s = self.stats
        s.calls, s.requests, s.wait_s = s.calls + 1, s.requests + len(batch), s.wait_s + wait
        s.candidates += sum(q.candidates for q in batch)
        s.last = (len(batch), wait)
        task = asyncio.get_running_loop().create_task(self._run(batch))
        task.add_done_callback(self._finished)

    def _finished(self, _task: asyncio.Task[None]) -> None:
        self.running -= 1
        self._kick()

    async def _run(self, batch: list[_Queued]) -> None:
        try:
            if len(batch) == 1 and self.single is not None:  # on the batcher's threads, the single graph
                scores = await self.grouped.pool.submit(self.single._run, batch[0].inputs)
            else:
                scores = await self.grouped.pool.submit(self.grouped._run, self.join(batch))
            parts = np.split(check_scores(scores, sum(q.candidates for q in batch), self.model),
                             np.cumsum([q.candidates for q in batch])[:-1])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, error=BackendError(f"{self.model} v{self.version}: ONNX Runtime failed: "
                                                            f"{exc}"))
                return
            for item in batch:  # alone, so a failure lands only on the request that causes it
                await self._run([item])
            return
        for item, part in zip(batch, parts, strict=True):
            _settle(item.future, part)

    def join(self, batch: list[_Queued]) -> dict[str, np.ndarray]:
        """The multi-user graph's inputs for a batch of single-request inputs."""
        out = {name: np.concatenate([q.inputs[name] for q in batch]) for name in self.specs}
        out[self.index_input] = np.repeat(np.arange(len(batch), dtype=np.int64), [q.candidates for q in batch])
        return out


def _settle(future: asyncio.Future[np.ndarray], result: np.ndarray | None = None,
            error: BaseException | None = None) -> None:
    if future.done():  # the request already timed out
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
