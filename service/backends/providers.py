"""Where the embedded ONNX Runtime computes: the execution providers handed to ``InferenceSession``.

``CTRSERVE_BACKEND_PROVIDER=cpu`` (default) runs on ``CPUExecutionProvider`` alone. ``cuda`` asks
for ``CUDAExecutionProvider`` on ``CTRSERVE_BACKEND_CUDA_DEVICE_ID`` with ``CPUExecutionProvider``
after it, which ONNX Runtime uses for the operators CUDA lacks. CUDA needs the ``onnxruntime-gpu``
wheel (the ``gateway-gpu`` image, docs/deploy.md "Embedded ONNX Runtime on a GPU"); without it, or
when the CUDA provider cannot start (no GPU, no driver, missing CUDA libraries), the session runs
on the CPU and one warning says why. What a session really runs on is read back from the session
(``get_providers()``), never assumed from the setting, and reported in ``/readyz`` and
``ctrserve_model_provider_info``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("ctrserve.service.backends")

Provider = Literal["cpu", "cuda"]
#: the setting's values -> ONNX Runtime's provider names
ORT_NAMES: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: ``OrtValue`` / ``IOBinding`` device type of each provider
DEVICE_TYPES: dict[str, str] = {"cpu": "cpu", "cuda": "cuda"}

_preload = threading.Lock()
_preloaded = False


@dataclass(frozen=True)
class ProviderOptions:
    """What the settings ask for: the provider, the GPU, and I/O binding (``auto``: with CUDA only)."""

    provider: Provider = "cpu"
    device_id: int = 0
    io_binding: Literal["auto", "on", "off"] = "auto"

    def binds(self, used: str) -> bool:
        """Whether calls on a session running on ``used`` bind their inputs and outputs."""
        return self.io_binding == "on" or (self.io_binding == "auto" and used != "cpu")


def session_providers(options: ProviderOptions, available: list[str]) -> tuple[list[Any], str | None]:
    """The ``providers`` argument of ``InferenceSession`` and, when CUDA was asked for but this
    ONNX Runtime build has no CUDA provider, the reason it was left out."""
    cpu = ORT_NAMES["cpu"]
    if options.provider == "cpu":
        return [cpu], None
    cuda = ORT_NAMES["cuda"]
    if cuda not in available:
        return [cpu], (f"this ONNX Runtime build has no {cuda} (it has {', '.join(available)}): the onnxruntime-gpu "
                       "wheel is not installed (use the gateway-gpu image, docs/deploy.md)")
    return [(cuda, {"device_id": str(options.device_id)}), cpu], None


def used_provider(session: Any) -> str:
    """The provider a session computes on: its first, as the setting names it (``cpu``, ``cuda``)."""
    first = session.get_providers()[0]
    return next((k for k, v in ORT_NAMES.items() if v == first), first)


def open_session(path: Path, sess_options: Any, options: ProviderOptions, where: str) -> tuple[Any, str]:
    """An ``InferenceSession`` on the providers ``options`` ask for, falling back to the CPU with
    one warning when CUDA cannot be had; returns it with the provider it really runs on."""
    import onnxruntime as ort

    providers, missing = session_providers(options, ort.get_available_providers())
    fallback = missing
    session = None
    if len(providers) > 1:
        _preload_cuda_libraries(ort)
        try:
            # enable_fallback=0: ORT's own fallback prints to stdout and would also switch a running
            # session to the CPU after a CUDA failure, leaving the reported provider wrong
            session = ort.InferenceSession(str(path), sess_options=sess_options, providers=providers,
                                           enable_fallback=0)
        except (RuntimeError, ValueError) as exc:  # the CUDA provider could not start
            fallback = f"the CUDA provider failed to start: {str(exc).strip()[:300]}"
    if session is None:
        session = ort.InferenceSession(str(path), sess_options=sess_options, providers=[ORT_NAMES["cpu"]])
    used = used_provider(session)
    if fallback is None and options.provider != used:  # ORT created the session without CUDA, silently
        fallback = f"ONNX Runtime did not register {ORT_NAMES[options.provider]} (no usable GPU or CUDA libraries)"
    if fallback is not None:
        log.warning(f"{where}: CTRSERVE_BACKEND_PROVIDER={options.provider} asked for, running on {used}: "
                    f"{fallback}", extra={"requested": options.provider, "provider": used})
    return session, used


def _preload_cuda_libraries(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries the ``nvidia-*`` wheels installed (``onnxruntime-gpu[cuda,
    cudnn]``): they are not on the loader's search path, so the CUDA provider would not find them.
    Once per process; a failure is left to the session creation that follows, which reports it."""
    global _preloaded
    with _preload:
        if _preloaded or not hasattr(ort, "preload_dlls"):
            return
        _preloaded = True
        try:
            ort.preload_dlls()
        except Exception as exc:  # a missing library shows again, with context, when the session starts
            log.info(f"onnxruntime.preload_dlls(): {exc}")
