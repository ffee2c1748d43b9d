"""Triton through tritonclient's gRPC asyncio client: one shared channel, one backend per arm's
model name and version. Inputs are sent with the manifest's names and dtypes; Triton runs the
model wherever it lives (the local tritonserver's Python backend or the NVIDIA container)."""

from __future__ import annotations

import asyncio

import numpy as np

from . import Backend, BackendError, BackendTimeout, BackendUnavailable, check_scores

_TRITON_DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


class TritonClient:
    """The gRPC channel shared by every Triton-served model of the gateway."""

    def __init__(self, url: str):
        from tritonclient.grpc.aio import InferenceServerClient

        self.url = url
        self.client = InferenceServerClient(url)

    async def server_ready(self, timeout: float = 2.0) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=timeout))
        except Exception:  # unreachable / deadline: simply not ready
            return False

    async def close(self) -> None:
        await self.client.close()


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


class TritonBackend(Backend):
    kind = "triton"
    provider = "triton"  # the server's model config (KIND_CPU / KIND_GPU) decides the device

    def __init__(self, model: str, version: int, client: TritonClient, output: str):
        super().__init__(model, version)
        self.client = client
        self.output = output

    async def start(self) -> None:
        if not await self.ready():
            raise BackendUnavailable(f"Triton at {self.client.url} does not have {self.model} version "
                                     f"{self.version} ready (load it, or check the server log)")

    async def ready(self) -> bool:
        try:
            return bool(await self.client.client.is_model_ready(self.model, str(self.version), client_timeout=2.0))
        except Exception:
            return False

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> np.ndarray:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        b = max(int(a.shape[0]) for a in inputs.values())
        wire = []
        for name, arr in inputs.items():
            arr = np.ascontiguousarray(arr)
            dtype = _TRITON_DTYPES.get(arr.dtype)
            if dtype is None:
                raise BackendError(f"input {name!r}: dtype {arr.dtype} cannot be sent to Triton")
            inp = InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            wire.append(inp)
        try:
            # the gRPC deadline cancels the call server-side too; wait_for guards a hung channel
            result = await asyncio.wait_for(
                self.client.client.infer(self.model, wire, model_version=str(self.version),
                                         outputs=[InferRequestedOutput(self.output)], client_timeout=timeout),
                timeout + 0.05)
        except TimeoutError:
            raise BackendTimeout(f"Triton {self.model} v{self.version}: no answer within {timeout * 1000:.0f} ms") \
                from None
        except InferenceServerException as exc:
            status = _status(exc)
            if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in str(exc):
                raise BackendTimeout(f"Triton {self.model} v{self.version}: inference exceeded "
                                     f"{timeout * 1000:.0f} ms") from None
            if "UNAVAILABLE" in status or "NOT_FOUND" in status or "unavailable" in str(exc).lower():
                raise BackendUnavailable(f"Triton {self.model} v{self.version}: {exc.message()}") from None
            raise BackendError(f"Triton {self.model} v{self.version}: {exc.message()}") from None
        out = result.as_numpy(self.output)
        if out is None:
            raise BackendError(f"Triton {self.model} v{self.version}: response lacks output {self.output!r}")
        return check_scores(out, b, f"Triton {self.model} v{self.version}")
