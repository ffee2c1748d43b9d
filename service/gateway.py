"""The scoring pipeline and the gateway's mutable state (routing table, models, stores).

One request: route (salted hash -> arm) -> one feature-store read -> assemble -> infer, each stage
timed, all within the per-request deadline. The routing table is an immutable ``Table`` that a
reload replaces with one assignment, so a request keeps the table (and models) it started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .assemble import AssemblyError
from .backends import BackendError, BackendTimeout, BackendUnavailable, batch_ride
from .errors import GatewayError
from .execution import ExecutionPolicy
from .features import FeatureStores
from .metrics import Metrics
from .reader import EarlyRead, FeatureReader
from .registry import LoadedModel, ModelLoadError, ModelRegistry, newest_model
from .request import ScoreRequest, read_keys
from .routing import NotFound, Overrides, Route, Router, RoutingConfig, RoutingError, load_config, single_arm_config
from .settings import GatewaySettings

log = logging.getLogger("ctrserve.service")


@dataclass(frozen=True)
class Table:
    """What a request needs from the current config: the router and the models it routes to.
    A request holds its Table to the end, so a reload never pulls a model from under it."""

    router: Router
    models: dict[tuple[str, int], LoadedModel]


@dataclass
class ScoreResult:
    """One scored request: the route it took (experiment, arm, model, version) and its scores."""

    route: Route
    scores: np.ndarray
    flags: dict[str, Any] = field(default_factory=dict)
    #: the model inputs the scores came from (user side ``[1, ...]``): what the impression log keeps
    inputs: dict[str, np.ndarray] | None = None


class ConfigError(RoutingError):
    """The initial routing config cannot be formed: no routing file and a repository that does not
    hold exactly one model, or an unreadable or invalid file. Retrying cannot fix it (unlike a
    model still loading); ``/readyz`` reports it as ``config_error``."""


def config_digest(config: RoutingConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


class Gateway:
    def __init__(self, settings: GatewaySettings, registry: ModelRegistry, stores: FeatureStores,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.registry = registry
        self.stores = stores
        self.metrics = metrics or Metrics()
        self.reader = FeatureReader(settings.store, self.metrics)
        self.execution = ExecutionPolicy(settings.backend)
        self.table: Table | None = None
        self.startup_error: str | None = "starting"
        #: the startup error is a configuration error (no retry will fix it)
        self.config_error = False
        self._reload_lock = asyncio.Lock()
        self._file_mtime: float | None = None

    # -- routing config ------------------------------------------------------------------
    def initial_config(self) -> RoutingConfig:
        path = self.settings.routing.config
        try:
            if path is not None:
                return load_config(path)
            return single_arm_config(*newest_model(self.registry.repo))
        except (RoutingError, ModelLoadError) as exc:
            raise ConfigError(str(exc)) from None

    async def apply(self, config: RoutingConfig, source: str) -> str:
        """Validate ``config`` against the models (load and warm every referenced version), then
        swap it in atomically. On any failure the old config stays and RoutingError is raised."""
        async with self._reload_lock:
            try:
                await self.registry.ensure(config.models())
                for key in config.models():
                    self.stores.for_model(self.registry.get(key).manifest)
            except (ModelLoadError, ValueError) as exc:
                self.metrics.reloads.labels(source, "rejected").inc()
                if self.table is not None:  # drop what this attempt loaded but nothing uses
                    await self.registry.retain(self.table.router.config.models())
                raise RoutingError(f"routing config rejected, previous config stays in effect: {exc}") from None
            old = self.table
            models = {k: self.registry.get(k) for k in config.models()}
            self.table = Table(Router(config), models)  # the atomic swap: one reference assignment
            await self.registry.retain(config.models())
            digest = config_digest(config)
            self.metrics.routing_info.clear()
            self.metrics.routing_info.labels(digest).set(1)
            self.metrics.models_ready.set(len(self.registry.loaded))
            self.metrics.model_provider.clear()
            for m in self.registry.loaded.values():
                self.metrics.model_provider.labels(m.name, str(m.version), m.backend.provider).set(1)
            self.metrics.reloads.labels(source, "applied").inc()
            self.startup_error, self.config_error = None, False
            log.info("routing config applied", extra={"source": source, "digest": digest,
                                                      "replaced": config_digest(old.router.config) if old else None})
            return digest

    async def reload_file(self, source: str = "file") -> str:
        path = self.settings.routing.config
        if path is None:
            raise RoutingError("no routing file configured (CTRSERVE_ROUTING_CONFIG)")
        try:
            config = load_config(path)
        except RoutingError:
            self.metrics.reloads.labels(source, "rejected").inc()
            raise
        return await self.apply(config, source)

    async def start(self, retry_s: float = 2.0) -> None:
        """Apply the initial config, retrying until it works (models may still be loading in
        Triton, the file may be fixed); ``/readyz`` reports the reason meanwhile."""
        while self.table is None:
            try:
                await self.apply(self.initial_config(), "startup")
            except (RoutingError, ModelLoadError) as exc:
                self.startup_error, self.config_error = str(exc), isinstance(exc, ConfigError)
                log.error("gateway not ready", extra={"reason": str(exc), "config_error": self.config_error})
                await asyncio.sleep(retry_s)
        self._file_mtime = _mtime(self.settings.routing.config)

    async def watch(self) -> None:
        """Poll the routing file; apply it when it changes (a bad file is logged and skipped)."""
        path = self.settings.routing.config
        while path is not None:
            await asyncio.sleep(self.settings.routing.watch_interval_s)
            mtime = _mtime(path)
            if mtime is None or mtime == self._file_mtime or self.table is None:
                continue
            self._file_mtime = mtime
            try:
                await self.reload_file("watch")
            except RoutingError as exc:
                log.error("routing file change rejected", extra={"reason": str(exc)})

    def require_table(self, what: str = "the gateway is not ready") -> Table:
        """The table in effect, or 503 (``what``: the message's start)."""
        table = self.table
        if table is None:
            raise GatewayError(503, "not_ready", f"{what}: {self.startup_error}")
        return table

    # -- readiness -----------------------------------------------------------------------
    async def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        ok = True
        if self.table is None:
            checks["routing"] = f"no config in effect: {self.startup_error}"
            ok = False
        else:
            checks["routing"] = f"ok ({config_digest(self.table.router.config)})"
            models_ok, reason = await self.registry.ready()
            checks["models"] = reason
            ok = ok and models_ok
        store_ok, reason = await self.stores.check(self.settings.store.timeout_ms / 1000)
        checks["store"] = reason
        if self.settings.store.failure == "degrade":
            checks["store"] += " (degrade mode: not required)" if not store_ok else ""
        else:
            ok = ok and store_ok
        return ok, checks

    # -- scoring -------------------------------------------------------------------------
    def begin_read(self, body: Any, qa: Overrides) -> EarlyRead | None:
        """Route a decoded, not yet validated body and send its store read now, so that Redis
        answers while the body is validated (``reader.FeatureReader``). Best effort, never
        raises: None when reads ahead are off, the body's shape is not plain, it does not route,
        or the store cannot take the read without waiting. ``qa``: the experiment and arm the QA
        headers ask for; the model override is the body's own."""
        table = self.table
        if table is None or not self.execution.reads_ahead or not self.reader.early_reads:
            return None
        keys = read_keys(body, self.settings.api.max_candidates)
        if keys is None:
            return None
        user_id, item_ids, model = keys
        overrides = replace(qa, model=model)
        try:
            route = table.router.route(user_id, overrides)
            loaded = table.models[route.key]
            if not loaded.backend.inline:
                return None
            pending = self.reader.begin(self.stores.for_model(loaded.manifest), user_id, item_ids)
        except (NotFound, KeyError, ValueError):
            return None  # scoring meets the same condition and answers it
        return None if pending is None else EarlyRead(table, route, (user_id, item_ids, overrides), pending)

    async def score(self, request: ScoreRequest, qa: Overrides = Overrides(),
                    early: EarlyRead | None = None) -> ScoreResult:
        """Score the request's candidates in order. A GatewayError raised after routing carries
        the route. ``qa``: the experiment and arm the QA headers ask for (the model override is the
        request's own field). ``early``: the read ``begin_read`` sent for this request, collected
        when it was sent for the same ids, overrides and routing table."""
        async with self.execution:
            t_start = time.perf_counter()
            table = self.require_table()
            overrides = replace(qa, model=request.model)
            item_ids = request.item_ids
            if early is not None and not early.matches(table, request.user_id, item_ids, overrides):
                early = None  # sent for something else (a reload in between, ids the validation coerced)
            try:
                route = early.route if early is not None else table.router.route(request.user_id, overrides)
            except NotFound as exc:
                raise GatewayError(404, "not_found", str(exc)) from None
            self.metrics.child(self.metrics.stage, "route", route.arm).observe(time.perf_counter() - t_start)
            try:
                scores, flags, inputs = await self._score_routed(table.models[route.key], route, request, item_ids,
                                                                 t_start, early)
            except GatewayError as exc:
                exc.route = route
                raise
            return ScoreResult(route, scores, flags, inputs)

    async def _score_routed(self, loaded: LoadedModel, route: Route, request: ScoreRequest, item_ids: list[str],
                            t_start: float, early: EarlyRead | None,
                            ) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
        """Read, assemble and infer for a routed request."""
        m, api = self.metrics, self.settings.api
        deadline = t_start + api.deadline_ms / 1000
        assembler = loaded.assembler
        try:
            assembler.check_request(request)
        except AssemblyError as exc:
            raise GatewayError(422, "invalid_features", str(exc)) from None
        inline = self.execution.inline(loaded.backend)
        t = time.perf_counter()
        store = self.stores.for_model(loaded.manifest)
        stored, flags = await self.reader.read(store, assembler, request.user_id, item_ids, deadline, inline,
                                               early.pending if early is not None else None)
        t2 = time.perf_counter()
        m.child(m.stage, "feature_fetch", route.arm).observe(t2 - t)
        try:
            inputs = assembler.assemble_request(request, stored)
        except AssemblyError as exc:
            raise GatewayError(422, "invalid_features", str(exc)) from None
        t3 = time.perf_counter()
        m.child(m.stage, "assembly", route.arm).observe(t3 - t2)
        remaining = deadline - t3
        if remaining <= 0:
            raise GatewayError(504, "deadline_exceeded", f"request deadline of {api.deadline_ms:g} ms exceeded "
                               "before inference")
        budget = min(self.settings.backend.timeout_ms / 1000, remaining)
        batch_ride.set(None)
        try:
            scores = loaded.backend.infer_inline(inputs) if inline else await loaded.backend.infer(inputs, budget)
        except BackendError as exc:
            m.backend_errors.labels(route.model, str(route.version), exc.kind).inc()
            if isinstance(exc, BackendTimeout):
                raise GatewayError(504, "backend_timeout", str(exc)) from None
            if isinstance(exc, BackendUnavailable):
                raise GatewayError(503, "backend_unavailable", str(exc)) from None
            raise GatewayError(502, "backend_error", str(exc)) from None
        m.child(m.stage, "inference", route.arm).observe(time.perf_counter() - t3)
        ride = batch_ride.get()
        if ride is not None:
            m.child(m.batch_requests, route.arm).observe(ride.requests)
            m.child(m.queue_wait, route.arm).observe(ride.wait_s)
            m.child(m.batch_calls, route.arm).inc(1 / ride.requests)
        return scores, flags, inputs

    async def close(self) -> None:
        await self.registry.close()
        await self.stores.close()


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return Path(path).stat().st_mtime_ns / 1e9
    except OSError:
        return None
