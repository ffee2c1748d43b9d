"""Model backends behind one async method: ``infer(inputs, timeout) -> scores [B]``.

- ``onnxruntime``: embedded ONNX Runtime, inference on its own thread(s) off the event loop (default).
- ``triton``: a Triton server through tritonclient's gRPC asyncio client (model name + version).

Both read the export manifest (input names, dtypes, output name); neither knows a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np


class BackendError(RuntimeError):
    """Inference failed (HTTP 502). ``kind`` labels the backend-error metric."""

    kind = "error"


class BackendTimeout(BackendError):
    """Inference did not finish within its budget (HTTP 504)."""

    kind = "timeout"


class BackendUnavailable(BackendError):
    """The backend cannot serve the model right now: not loaded, not ready, unreachable (HTTP 503)."""

    kind = "unavailable"


@dataclass(frozen=True)
class BatchRide:
    """How one request was served by a batching backend: the requests in its call (itself
    included) and its wait in the queue."""

    requests: int
    wait_s: float


#: Set by a batching backend in the calling request's context once its scores are back (a
#: directly awaited coroutine shares its caller's context), read by the gateway for the per-arm
#: batch metrics. Unset (None) for backends that run each request alone.
batch_ride: ContextVar[BatchRide | None] = ContextVar("ctrserve_batch_ride", default=None)


class Backend(ABC):
    """One loaded model version."""

    #: short label for metrics and logs
    kind: str = "backend"
    #: where the model computes, for ``/readyz`` and metrics: the embedded runtime's execution
    #: provider (``cpu``, ``cuda``), or ``triton`` (the server's model config decides)
    provider: str = "unknown"

    def __init__(self, model: str, version: int):
        self.model = model
        self.version = version

    @abstractmethod
    async def start(self) -> None:
        """Load the model (or check the server has it) so that ``infer`` can be called."""

    @abstractmethod
    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> np.ndarray:
        """Scores ``[B]`` (float32 probabilities) for named inputs; ``timeout`` in seconds."""

    #: ``infer_inline`` is implemented: the call can run on the caller's thread (embedded runtimes)
    inline: bool = False

    def infer_inline(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``infer`` run on the calling thread, blocking it (``CTRSERVE_BACKEND_EXECUTION=inline``)."""
        raise NotImplementedError(f"the {self.kind} backend cannot run inline")

    @abstractmethod
    async def ready(self) -> bool:
        """True when the model can serve now (cheap; used by ``/readyz``)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources owned by this model (shared clients are closed by their owner)."""


def check_scores(scores: np.ndarray, b: int, where: str) -> np.ndarray:
    """The output contract: ``b`` finite probabilities."""
    out = np.asarray(scores, dtype=np.float32).reshape(-1)
    if out.shape[0] != b:
        raise BackendError(f"{where} returned {out.shape[0]} scores for {b} candidates")
    if not np.isfinite(out).all():
        raise BackendError(f"{where} returned non-finite scores")
    return out
