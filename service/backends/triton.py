"""Triton through tritonclient's gRPC asyncio client: one shared channel, one backend per arm's
model name and version. Inputs are sent with the manifest's names and dtypes; Triton runs the
model wherever it lives (the local tritonserver's Python backend or the NVIDIA container).

A model whose config batches requests (``max_batch_size > 0``: exported with the multi-user graph,
export/triton_repo.py) takes each request as a batch of one user: every input is sent as
``[1, *dims]`` of its config dims (candidates ``[1, B, ...]``, a user id ``[1, 1]``) and the
scores come back ``[1, B]``. ``start`` reads the config from Triton, so the gateway follows
whatever config the server loaded."""

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
        #: batched configs: each input's wire shape ``[1, *dims]`` (-1: the candidate count)
        self.wire_shapes: dict[str, list[int]] = {}

    async def start(self) -> None:
        if not await self.ready():
            raise BackendUnavailable(f"Triton at {self.client.url} does not have {self.model} version "
                                     f"{self.version} ready (load it, or check the server log)")
        try:
            config = await self.client.client.get_model_config(self.model, str(self.version), as_json=True,
                                                               client_timeout=5.0)
        except Exception as exc:
            raise BackendUnavailable(f"Triton {self.model} v{self.version}: cannot read its config: {exc}") from None
        config = config.get("config", config)
        batched = int(config.get("max_batch_size", 0)) > 0
        self.wire_shapes = {i["name"]: [1, *(int(d) for d in i.get("dims", []))] for i in config.get("input", [])
                            } if batched else {}

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
            if name in self.wire_shapes:
                try:
                    arr = arr.reshape(self.wire_shapes[name])
                except ValueError:
                    raise BackendError(f"input {name!r}: shape {list(arr.shape)} does not fit the config's "
                                       f"{self.wire_shapes[name]}") from None
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
        if self.wire_shapes:
            out = out.reshape(-1)  # [1, B]: the request's batch of one user
        return check_scores(out, b, f"Triton {self.model} v{self.version}")
