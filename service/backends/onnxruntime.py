"""Embedded ONNX Runtime: one ``InferenceSession`` per model version, run off the event loop on
that version's own thread(s) (ORT releases the GIL while it computes), so a slow call never blocks
the event loop and loading a new version never queues behind, or delays, another one's requests.
Two threads per version by default (``CTRSERVE_BACKEND_POOL_THREADS``): two requests arriving
together compute on both cores (docs/decisions.md, "Two inference threads per model
version"). On the CPU by default; ``CTRSERVE_BACKEND_PROVIDER=cuda`` asks for a GPU (providers.py:
the provider list, the fallback to the CPU, the provider really in use)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import Backend, BackendError, BackendTimeout, BackendUnavailable, check_scores
from .providers import DEVICE_TYPES, ProviderOptions, open_session


class Workers:
    """Threads that run calls handed over from the event loop: what ``loop.run_in_executor`` with
    a ThreadPoolExecutor does, with less work on both sides of the hand-off (no concurrent Future
    with its lock and condition, no future chaining, no idle-thread bookkeeping): a queue put, a
    queue get, one ``call_soon_threadsafe`` with the result (docs/decisions.md, "Scoring path in
    the middleware beside the FastAPI route"). The threads hold no reference to their owner; they
    exit on ``close()`` or when the owner is garbage collected, like a ThreadPoolExecutor's."""

    def __init__(self, owner: object, threads: int, name: str):
        self.threads = threads
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=_work, args=(self._queue,), name=f"{name}_{i}", daemon=True).start()
        self._stop = weakref.finalize(owner, _stop, self._queue, threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on a worker thread; the future resolves on the calling event loop. A
        cancelled future (a timeout) drops the result; the call itself runs to its end."""
        if not self._stop.alive:
            raise RuntimeError("the workers are closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return fut

    def close(self) -> None:
        """Let the threads finish the calls queued so far, then exit (does not wait for them)."""
        self._stop()


def _work(q: queue.SimpleQueue[Any]) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        fn, args, loop, fut = item
        del item
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting request, as an executor does
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits for the answer
            loop.call_soon_threadsafe(_resolve, fut, result, error)
        del fn, args, loop, fut, result, error  # the inputs and session are not kept while idle


def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _stop(q: queue.SimpleQueue[Any], threads: int) -> None:
    for _ in range(threads):
        q.put(None)


class OnnxRuntimeBackend(Backend):
    kind = "onnxruntime"
    inline = True

    def __init__(self, model: str, version: int, path: Path, output: str, threads: int = 1,
                 intra_op_threads: int = 1, inter_op_threads: int = 1, spinning: bool = False,
                 providers: ProviderOptions | None = None):
        super().__init__(model, version)
        self.path = Path(path)
        self.output = output
        # dropped with the backend: its idle threads exit once the backend is garbage collected
        self.pool = Workers(self, threads, f"ort-{model}-v{version}")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.spinning = spinning
        self.providers = providers or ProviderOptions()
        #: the provider the session runs on (``cpu``, ``cuda``), known once it is loaded
        self.provider = "not loaded"
        self.io_binding = False
        self._session = None

    def _load(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if not self.spinning:  # measured: intra-op 2 with spinning ran 2-2.5x slower on a busy 2-core machine
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session, self.provider = open_session(self.path, opts, self.providers, f"{self.model} v{self.version}")
        self.io_binding = self.providers.binds(self.provider)
        return session

    async def start(self) -> None:
        if not self.path.exists():
            raise BackendUnavailable(f"{self.model} v{self.version}: no model file {self.path}")
        try:
            self._session = await self.pool.submit(self._load)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise BackendUnavailable(f"{self.model} v{self.version}: ONNX Runtime cannot load {self.path}: "
                                     f"{exc}") from None
        outputs = [o.name for o in self._session.get_outputs()]
        if self.output not in outputs:
            raise BackendUnavailable(f"{self.model} v{self.version}: output {self.output!r} not in {outputs}")

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.io_binding:
            return self._run_bound(inputs)
        return self._session.run([self.output], inputs)[0]

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One call through I/O binding: the inputs are placed on the provider's device before the
        call and the output is allocated there, then copied back once (docs/deploy.md, "Embedded
        ONNX Runtime on a GPU"). On the CPU provider the same code path runs with host memory, which
        is how it is tested. A binding per call: calls of one session run on several threads."""
        from onnxruntime import OrtValue

        device = DEVICE_TYPES.get(self.provider, "cpu")
        device_id = self.providers.device_id if device != "cpu" else 0
        binding = self._session.io_binding()
        for name, arr in inputs.items():
            binding.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device,
                                                                           device_id))
        binding.bind_output(self.output, device, device_id)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> np.ndarray:
        self._require_loaded()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the call in one more Task
            async with asyncio.timeout(timeout):
                out = await self.pool.submit(self._run, inputs)
        except TimeoutError:
            # the worker thread finishes the call in the background; the request is answered now
            raise BackendTimeout(f"{self.model} v{self.version}: inference exceeded {timeout * 1000:.0f} ms") from None
        except Exception as exc:
            raise self._failed(exc) from None
        return check_scores(out, _candidates(inputs), f"{self.model} v{self.version}")

    def infer_inline(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self._require_loaded()
        try:
            out = self._run(inputs)
        except Exception as exc:
            raise self._failed(exc) from None
        return check_scores(out, _candidates(inputs), f"{self.model} v{self.version}")

    def _require_loaded(self) -> None:
        if self._session is None:
            raise BackendUnavailable(f"{self.model} v{self.version} is not loaded")

    def _failed(self, exc: Exception) -> BackendError:
        return BackendError(f"{self.model} v{self.version}: ONNX Runtime failed: {exc}")

    async def ready(self) -> bool:
        return self._session is not None

    async def close(self) -> None:
        self._session = None
        self.pool.close()


def _candidates(inputs: dict[str, np.ndarray]) -> int:
    """B: the largest leading dimension (user-side inputs have batch 1)."""
    return max(int(a.shape[0]) for a in inputs.values())
