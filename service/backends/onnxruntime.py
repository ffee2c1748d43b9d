"""Embedded ONNX Runtime: one ``InferenceSession`` per model version, run in a shared thread
pool so a slow call never blocks the event loop (ORT releases the GIL while it computes)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import Backend, BackendError, BackendTimeout, BackendUnavailable, check_scores


class OnnxRuntimeBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, model: str, version: int, path: Path, output: str, pool: ThreadPoolExecutor,
                 intra_op_threads: int = 1, inter_op_threads: int = 1):
        super().__init__(model, version)
        self.path = Path(path)
        self.output = output
        self.pool = pool
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._session = None

    def _load(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
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
        fut = loop.run_in_executor(self.pool, self._run, inputs)
        try:
            out = await asyncio.wait_for(fut, timeout)
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


def _candidates(inputs: dict[str, np.ndarray]) -> int:
    """B: the largest leading dimension (user-side inputs have batch 1)."""
    return max(int(a.shape[0]) for a in inputs.values())
