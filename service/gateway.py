"""The scoring pipeline and the gateway's mutable state (routing table, models, stores).

One request: route (salted hash -> arm) -> one feature-store read -> assemble -> infer, each stage
timed, all within the per-request deadline. The routing table is an immutable ``Router`` that a
reload replaces with one assignment, so a request keeps the table (and model) it started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctrserve.feature_store.base import PendingRead
from ctrserve.feature_store.errors import FeatureStoreError, StoreNotLoaded

from .assemble import AssemblyError
from .backends import BackendError, BackendTimeout, BackendUnavailable
from .features import FeatureStores
from .metrics import Metrics
from .registry import LoadedModel, ModelLoadError, ModelRegistry, newest_model
from .routing import NotFound, Route, Router, RoutingConfig, RoutingError, load_config, single_arm_config
from .settings import GatewaySettings

log = logging.getLogger("ctrserve.service")


class GatewayError(Exception):
    """An error answered with ``status`` and a JSON body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Table:
    """What a request needs from the current config: the router and the models it routes to.
    A request holds its Table to the end, so a reload never pulls a model from under it."""

    router: Router
    models: dict[tuple[str, int], LoadedModel]


@dataclass
class ScoreResult:
    model: str
    version: int
    arm: str
    experiment: str
    scores: np.ndarray
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EarlyRead:
    """A feature-store read sent before the request body was validated (``Gateway.begin_read``),
    with what it was sent for; ``score`` collects it when the validated request is the same."""

    table: Table
    route: Route
    args: tuple[str, list[str], str | None, str | None, str | None]  # user, items, model, experiment, arm
    pending: PendingRead


def config_digest(config: RoutingConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


class Gateway:
    def __init__(self, settings: GatewaySettings, registry: ModelRegistry, stores: FeatureStores,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.registry = registry
        self.stores = stores
        self.metrics = metrics or Metrics()
        self.table: Table | None = None
        self.startup_error: str | None = "starting"
        self._reload_lock = asyncio.Lock()
        self._file_mtime: float | None = None
        self._scoring = 0  # requests inside score(): the `auto` execution's load signal
        self._overlap_until = 0.0  # auto: until then, a lone request takes the thread path too

    # -- routing config ------------------------------------------------------------------
    def initial_config(self) -> RoutingConfig:
        path = self.settings.routing.config
        if path is not None:
            return load_config(path)
        return single_arm_config(*newest_model(self.registry.repo))

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
            self.metrics.reloads.labels(source, "applied").inc()
            self.startup_error = None
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
                self.startup_error = str(exc)
                log.error("gateway not ready", extra={"reason": str(exc)})
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
    def begin_read(self, user_id: str, item_ids: list[str], model: str | None = None,
                   experiment: str | None = None, arm: str | None = None) -> EarlyRead | None:
        """Inline and auto execution: route the request and send its feature-store read now, so
        that Redis answers while the caller validates the body (the wait for Redis, most of it the
        wake-up of an idle server, overlaps that work). Best effort, never raises: None when the
        execution is ``thread``, the request does not route, or the store cannot take a blocking
        read; the caller hands the result to ``score`` and cancels it if ``score`` is not reached."""
        table = self.table
        if table is None or self.settings.backend.execution == "thread" or not self.settings.store.early_read:
            return None
        try:
            route = _route(table, user_id, model, experiment, arm)
            loaded = table.models[(route.model, route.version)]
            if not loaded.backend.inline:
                return None
            # the whole store budget: settings keep it below the request deadline, which has just begun
            budget = self.settings.store.timeout_ms / 1000
            pending = self.stores.for_model(loaded.manifest).begin_read_blocking(user_id, item_ids, budget,
                                                                                 wait=False)
        except (NotFound, FeatureStoreError, KeyError, ValueError):
            return None  # score() meets the same condition and answers it
        if pending is None:
            return None
        return EarlyRead(table, route, (user_id, item_ids, model, experiment, arm), pending)

    async def score(
        self,
        user_id: str,
        item_ids: Sequence[str],
        context: Mapping[str, Any] | None,
        candidate_features: Sequence[Mapping[str, Any] | None],
        model: str | None = None,
        experiment: str | None = None,
        arm: str | None = None,
        route_label: list[str] | None = None,
        early: EarlyRead | None = None,
    ) -> ScoreResult:
        """Score candidates in order. ``route_label`` receives the arm name and ``model:version`` as
        soon as they are known (so a failed request is still counted and labelled under its arm).
        ``early``: the read ``begin_read`` sent for this request, used when it was sent for the
        same arguments and routing table (the caller cancels it in any case; a collected read
        ignores that)."""
        self._scoring += 1
        try:
            if self.settings.backend.execution == "auto":
                # one loop turn: requests the server has already read get to register before this one
                # decides (a request running inline would otherwise finish before they start)
                await asyncio.sleep(0)
            return await self._score(user_id, item_ids, context, candidate_features, model, experiment, arm,
                                     route_label, early)
        finally:
            self._scoring -= 1

    async def _score(
        self,
        user_id: str,
        item_ids: Sequence[str],
        context: Mapping[str, Any] | None,
        candidate_features: Sequence[Mapping[str, Any] | None],
        model: str | None,
        experiment: str | None,
        arm: str | None,
        route_label: list[str] | None,
        early: EarlyRead | None = None,
    ) -> ScoreResult:
        api = self.settings.api
        t_start = time.perf_counter()
        deadline = t_start + api.deadline_ms / 1000
        table = self.table
        if table is None:
            raise GatewayError(503, "not_ready", f"the gateway is not ready: {self.startup_error}")
        if early is not None and (early.table is not table or early.args != (user_id, item_ids, model, experiment,
                                                                                 arm)):
            early = None  # sent for something else (a reload in between, ids the validation coerced)
        try:
            route = early.route if early is not None else _route(table, user_id, model, experiment, arm)
        except NotFound as exc:
            raise GatewayError(404, "not_found", str(exc)) from None
        if route_label is not None:
            route_label += [route.arm, f"{route.model}:{route.version}"]
        loaded = table.models[(route.model, route.version)]
        assembler = loaded.assembler
        m = self.metrics
        t = time.perf_counter()
        m.child(m.stage, "route", route.arm).observe(t - t_start)
        try:
            assembler.check_keys(context, candidate_features)
        except AssemblyError as exc:
            raise GatewayError(422, "invalid_features", str(exc)) from None

        flags: dict[str, Any] = {}
        store = self.stores.for_model(loaded.manifest)
        # inline: the store read, assembly and inference run here without awaiting (no thread
        # hand-offs); the first read and a read across a version flip still go through the async path.
        # auto: inline when this is the only request being scored, else the thread path, so that
        # under load the event loop keeps reading requests while the inference thread computes. An
        # early read is collected either way: it was sent a validation ago, so its answer is
        # usually there (awaiting a second read instead cost auto the early read's gain: 0.27 against
        # 0.12 ms feature fetch, `ctrserve bench all --execution auto`, docs/gateway.md session 9)
        execution = self.settings.backend.execution
        # Once requests have overlapped, auto keeps even a lone one on the thread path for
        # `auto_overlap_s`: run inline, it would hold the event loop, and a request arriving
        # meanwhile would wait for it while an inference thread idles (bench load at half
        # saturation, docs/gateway.md session 10); a sequential client never overlaps and stays inline
        auto_inline = False
        if execution == "auto":
            now = time.perf_counter()
            if self._scoring > 1:
                self._overlap_until = now + self.settings.backend.auto_overlap_s
            auto_inline = self._scoring == 1 and now >= self._overlap_until
        inline = loaded.backend.inline and (execution == "inline" or auto_inline)
        budget = min(self.settings.store.timeout_ms / 1000, deadline - time.perf_counter())
        try:
            stored = None
            if early is not None and budget > 0:
                stored = early.pending.result()
            elif inline and budget > 0:
                stored = store.online_read_blocking(user_id, item_ids, budget)
            if stored is None:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the read in one more Task
                async with asyncio.timeout(max(budget, 0.0)):
                    stored = await store.online_read(user_id, item_ids)
        except (FeatureStoreError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {budget * 1000:.0f} ms"
            m.store_errors.labels(type(exc).__name__).inc()
            if self.settings.store.failure != "degrade":
                hint = "nothing is bulk-loaded" if isinstance(exc, StoreNotLoaded) else "Redis is down or slow"
                raise GatewayError(503, "store_unavailable", f"feature store unavailable ({hint}): {reason}") \
                    from None
            log.warning("store failed, scoring with cold-start features", extra={"reason": reason})
            m.degraded.inc()
            stored = assembler.cold_start(user_id, item_ids)
            flags["degraded"] = True
        else:
            self._count_lookups(stored, len(item_ids))
            if stored.user_missing:
                flags["user_missing"] = True
            if len(stored.missing_items):
                flags["missing_items"] = [item_ids[i] for i in np.asarray(stored.missing_items).tolist()]
        t2 = time.perf_counter()
        m.child(m.stage, "feature_fetch", route.arm).observe(t2 - t)

        try:
            inputs = assembler.assemble(user_id, item_ids, stored, context, candidate_features)
        except AssemblyError as exc:
            raise GatewayError(422, "invalid_features", str(exc)) from None
        t3 = time.perf_counter()
        m.child(m.stage, "assembly", route.arm).observe(t3 - t2)

        remaining = deadline - t3
        if remaining <= 0:
            raise GatewayError(504, "deadline_exceeded", f"request deadline of {api.deadline_ms:g} ms exceeded "
                               "before inference")
        budget = min(self.settings.backend.timeout_ms / 1000, remaining)
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
        return ScoreResult(route.model, route.version, route.arm, route.experiment, scores, flags)

    def _count_lookups(self, stored: Any, b: int) -> None:
        m = self.metrics
        m.child(m.store_lookups, "user", "miss" if stored.user_missing else "hit").inc()
        missing = len(stored.missing_items)
        if b - missing:
            m.child(m.store_lookups, "item", "hit").inc(b - missing)
        if missing:
            m.child(m.store_lookups, "item", "miss").inc(missing)
        hits = int(getattr(stored, "item_cache_hits", 0) or 0)
        if hits:
            m.child(m.item_cache, "hit").inc(hits)
        if b - hits:
            m.child(m.item_cache, "miss").inc(b - hits)

    async def close(self) -> None:
        await self.registry.close()
        await self.stores.close()


def _route(table: Table, user_id: str, model: str | None, experiment: str | None, arm: str | None) -> Route:
    """The arm and model version of a request: ``model`` bypasses the split (raises NotFound)."""
    return table.router.direct(model) if model else table.router.assign(user_id, experiment, arm)


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return Path(path).stat().st_mtime_ns / 1e9
    except OSError:
        return None
