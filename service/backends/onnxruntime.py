"""Embedded ONNX Runtime: one ``InferenceSession`` per model version, run off the event loop on
that version's own executor (ORT releases the GIL while it computes), so a slow call never blocks
the event loop and loading a new version never queues behind, or delays, another one's requests.
One executor thread per version by default: a second thread sharing the session measured fewer
requests/s on 2 cores (loadtests/bench_gateway_overhead.py)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import Backend, BackendError, BackendTimeout, BackendUnavailable, check_scores


class OnnxRuntimeBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, model: str, version: int, path: Path, output: str, threads: int = 1,
                 intra_op_threads: int = 1, inter_op_threads: int = 1, spinning: bool = False):
        super().__init__(model, version)
        self.path = Path(path)
        self.output = output
        # dropped with the backend: idle executor threads exit once the executor is garbage collected
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=f"ort-{model}-v{version}")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.spinning = spinning
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
        return ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])

    async def start(self) -> None:
        if not self.path.exists():
            raise BackendUnavailable(f"{self.model} v{self.version}: no model file {self.path}")
        loop = asyncio.get_running_loop()
        try:
            self._session = await loop.run_in_executor(self.pool, self._load)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise BackendUnavailable(f"{self.model} v{self.version}: ONNX Runtime cannot load {self.path}: "
                                     f"{exc}") from None
        outputs = [o.name for o in self._session.get_outputs()]
        if self.output not in outputs:
            raise BackendUnavailable(f"{self.model} v{self.version}: output {self.output!r} not in {outputs}")

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run([self.output], inputs)[0]

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> np.ndarray:
        if self._session is None:
            raise BackendUnavailable(f"{self.model} v{self.version} is not loaded")
        b = _candidates(inputs)
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the call in one more Task
            async with asyncio.timeout(timeout):
                out = await loop.run_in_executor(self.pool, self._run, inputs)
        except TimeoutError:
            # the worker thread finishes the call in the background; the request is answered now
            raise BackendTimeout(f"{self.model} v{self.version}: inference exceeded {timeout * 1000:.0f} ms") from None
        except Exception as exc:
            raise BackendError(f"{self.model} v{self.version}: ONNX Runtime failed: {exc}") from None
        return check_scores(out, b, f"{self.model} v{self.version}")

    async def ready(self) -> bool:
        return self._session is not None

    async def close(self) -> None:
        self._session = None
        self.pool.shutdown(wait=False, cancel_futures=True)


def _candidates(inputs: dict[str, np.ndarray]) -> int:
    """B: the largest leading dimension (user-side inputs have batch 1)."""
    return max(int(a.shape[0]) for a in inputs.values())
