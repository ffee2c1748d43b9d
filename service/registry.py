"""Loaded model versions: manifest + assembler + backend, loaded from the exported model
repository (``<repo>/<name>/<version>/manifest.json``) and warmed up before any config uses them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ctrserve.contract.manifest import Manifest, list_versions

from .assemble import Assembler
from .backends import Backend, BackendError
from .backends.providers import ProviderOptions
from .settings import BackendSettings

log = logging.getLogger("ctrserve.service.registry")
Key = tuple[str, int]


class ModelLoadError(RuntimeError):
    """A model version that cannot be served (missing, unreadable, failed warm-up)."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    manifest: Manifest
    assembler: Assembler
    backend: Backend


def newest_model(repo: Path) -> Key:
    """The only model in ``repo`` and its newest version (the default route without a config)."""
    names = sorted(d.name for d in Path(repo).iterdir() if d.is_dir() and list_versions(d)) if Path(repo).is_dir() \
        else []
    if len(names) != 1:
        found = f"models {names}" if names else "no exported model"
        raise ModelLoadError(f"no routing config given and the model repository {repo} holds {found}; set "
                             "CTRSERVE_ROUTING_CONFIG (see docs/gateway.md) or export exactly one model")
    return names[0], max(list_versions(Path(repo) / names[0]))


class ModelRegistry:
    """Loads (model, version) pairs on demand with the configured backend; shared by configs."""

    def __init__(self, settings: BackendSettings, kind: str, triton_client=None):
        self.settings = settings
        self.kind = kind
        self.repo = Path(settings.model_repository)
        self.triton = triton_client
        self._models: dict[Key, LoadedModel] = {}
        self._loading: dict[Key, asyncio.Task] = {}

    def get(self, key: Key) -> LoadedModel | None:
        return self._models.get(key)

    @property
    def loaded(self) -> dict[Key, LoadedModel]:
        return dict(self._models)

    def _backend(self, manifest: Manifest, version_dir: Path) -> Backend:
        if self.kind == "triton":
            from .backends.triton import TritonBackend

            return TritonBackend(manifest.name, manifest.version, self.triton, manifest.output.name)
        from .backends.onnxruntime import OnnxRuntimeBackend

        if manifest.format != "onnx":
            raise ModelLoadError(f"{manifest.name} v{manifest.version} is {manifest.format}; the embedded backend "
                                 "runs ONNX only (serve TorchScript through Triton)")
        s = self.settings
        providers = ProviderOptions(s.provider, s.cuda_device_id, s.io_binding)

        def session(file: str, threads: int) -> OnnxRuntimeBackend:
            return OnnxRuntimeBackend(manifest.name, manifest.version, version_dir / file, manifest.output.name,
                                      threads, s.ort_intra_op_threads, s.ort_inter_op_threads, s.ort_spinning,
                                      providers)

        if s.batch_max_candidates and manifest.grouped is not None:
            from .backends.batching import BatchingBackend

            # a call of one request runs the single-user graph (user-side work once, not per candidate)
            return BatchingBackend(manifest, session(manifest.grouped.file, s.pool_threads), s.batch_max_candidates,
                                   s.batch_max_wait_ms / 1000, session(manifest.file, 1))
        return session(manifest.file, s.pool_threads)

    async def _load(self, key: Key) -> LoadedModel:
        name, version = key
        version_dir = self.repo / name / str(version)
        t0 = time.perf_counter()
        try:
            assembler = await asyncio.to_thread(Assembler.from_dir, version_dir)
        except FileNotFoundError:
            have = sorted(list_versions(self.repo / name)) if (self.repo / name).is_dir() else []
            raise ModelLoadError(f"model {name!r} version {version} is not in {self.repo} (versions there: "
                                 f"{have or 'none'})") from None
        except (ValueError, OSError) as exc:
            raise ModelLoadError(f"model {name!r} version {version}: unreadable export in {version_dir}: {exc}") \
                from None
        manifest = Manifest.load(version_dir)
        if (manifest.name, manifest.version) != key:
            raise ModelLoadError(f"{version_dir}: manifest says {manifest.name} v{manifest.version}")
        backend = self._backend(manifest, version_dir)
        timeout = self.settings.load_timeout_s
        try:
            await asyncio.wait_for(backend.start(), timeout)
            inputs = assembler.warmup_inputs(self.settings.warmup_candidates)
            for _ in range(2):  # the first call pays one-off allocations
                await backend.infer(inputs, timeout)
        except (BackendError, TimeoutError) as exc:
            await backend.close()
            raise ModelLoadError(f"model {name!r} version {version} failed to load or warm up on "
                                 f"{self.kind}: {exc or 'timed out'}") from None
        log.info("model loaded", extra={"model": name, "version": version, "backend": self.kind,
                                        "provider": backend.provider,
                                        "ms": round((time.perf_counter() - t0) * 1000, 1)})
        return LoadedModel(name, version, manifest, assembler, backend)

    async def ensure(self, keys: set[Key]) -> None:
        """Load every key not loaded yet (concurrently); raise ModelLoadError naming each failure."""
        missing = sorted(k for k in keys if k not in self._models)
        for k in missing:
            if k not in self._loading:
                self._loading[k] = asyncio.ensure_future(self._load(k))
        results = await asyncio.gather(*(self._loading[k] for k in missing), return_exceptions=True)
        errors = []
        for k, res in zip(missing, results, strict=True):
            self._loading.pop(k, None)
            if isinstance(res, BaseException):
                errors.append(str(res) if isinstance(res, ModelLoadError) else f"{k[0]} v{k[1]}: {res!r}")
            else:
                self._models[k] = res
        if errors:
            raise ModelLoadError("; ".join(errors))

    async def retain(self, keys: set[Key]) -> None:
        """Forget models no config uses. In-flight requests keep their own reference, so an
        ONNX session is freed only when the last of them finishes."""
        for k in [k for k in self._models if k not in keys]:
            self._models.pop(k)
            log.info("model released", extra={"model": k[0], "version": k[1]})

    def placement(self) -> dict[str, str]:
        """Where each loaded version computes (``"name vN"`` -> provider: ``cpu``, ``cuda``, ``triton``)."""
        return {f"{m.name} v{m.version}": m.backend.provider for m in sorted(self._models.values(),
                                                                           key=lambda m: (m.name, m.version))}

    async def ready(self) -> tuple[bool, str]:
        bad = [f"{m.name} v{m.version}" for m in list(self._models.values()) if not await m.backend.ready()]
        return (not bad), (f"not ready: {bad}" if bad else "ok")

    async def close(self) -> None:
        for m in list(self._models.values()):
            await m.backend.close()
        self._models.clear()
