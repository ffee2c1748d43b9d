"""The gateway's view of the feature store: one online store per (namespace, schema), shared by
every served model that reads it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ctrserve.contract.manifest import Manifest
from ctrserve.contract.store_schema import StoreSchema
from ctrserve.feature_store.base import OnlineStore
from ctrserve.feature_store.config import RedisStoreConfig
from ctrserve.feature_store.errors import FeatureStoreError

#: ``factory(schema, namespace, vocab_sha256)``: the store for one namespace; ``vocab_sha256`` (or
#: None) is the vocabulary the model was trained with, which the loaded data must match
StoreFactory = Callable[[StoreSchema, str, str | None], OnlineStore]


def gateway_store_config(store_timeout_ms: float, **overrides: object) -> RedisStoreConfig:
    """The Redis settings the gateway reads with (``CTRSERVE_REDIS_*``, then ``overrides``).
    Unless ``CTRSERVE_REDIS_TIMEOUT_MS`` is set, the Redis call gets the gateway's whole store
    budget (``CTRSERVE_STORE_TIMEOUT_MS``): the feature store's own 50 ms default fired under load
    while the event loop was busy with other requests, failing reads the gateway would have waited
    for. The store budget (below the request deadline, checked at start) still bounds every read."""
    config = RedisStoreConfig(**overrides)
    if "timeout_ms" not in config.model_fields_set:
        config = config.model_copy(update={"timeout_ms": store_timeout_ms})
    return config


def redis_factory(config: RedisStoreConfig) -> StoreFactory:
    def make(schema: StoreSchema, namespace: str, vocab_sha256: str | None = None) -> OnlineStore:
        from ctrserve.feature_store.backends import open_store  # redis+cluster:// URLs: the Redis Cluster backend

        return open_store(schema, config, namespace=namespace, vocab_sha256=vocab_sha256)

    make.redis_config = config  # type: ignore[attr-defined]  # the closed loop uses the same Redis
    return make


class NamespaceError(ValueError):
    """The manifest does not say which feature-store namespace the model reads."""


def namespace_of(manifest: Manifest, override: str | None = None) -> str:
    """The namespace a model's features were bulk-loaded under: ``CTRSERVE_STORE_NAMESPACE`` if
    set, else the one export recorded in the manifest (the prepared directory's name, what
    ``ctrserve store load`` uses). Manifests written before export recorded it need the override:
    guessing (e.g. the dataset name) could read another preparation's ids."""
    if override:
        return override
    if manifest.store is not None:
        return manifest.store.namespace
    raise NamespaceError(
        f"{manifest.name} v{manifest.version}: the manifest records no feature-store namespace (exported before "
        "manifests carried `store`); re-export the run with `ctrserve export`, or set CTRSERVE_STORE_NAMESPACE "
        "(`ctrserve serve --namespace`) to the name `ctrserve store load --dataset` used")


class FeatureStores:
    def __init__(self, factory: StoreFactory, namespace: str | None = None):
        self._factory = factory
        self._namespace = namespace
        self._stores: dict[tuple[str, str], OnlineStore] = {}
        self._vocab: dict[tuple[str, str], tuple[str | None, str]] = {}  # -> (vocab sha256, first model)
        self._by_model: dict[tuple[str, int], OnlineStore] = {}

    def for_model(self, manifest: Manifest) -> OnlineStore:
        """The store a model reads; raises ValueError (config rejected) when the manifest names no
        namespace or two models disagree about the vocabulary of one namespace."""
        key_model = (manifest.name, manifest.version)
        store = self._by_model.get(key_model)
        if store is not None:
            return store
        schema = StoreSchema.from_feature_map(manifest.feature_map)
        ns = namespace_of(manifest, self._namespace)
        vocab = manifest.store.vocab_sha256 if manifest.store is not None else None
        key = (ns, schema.to_json())
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = self._factory(schema, ns, vocab)
            self._vocab[key] = (vocab, f"{manifest.name} v{manifest.version}")
        else:
            known, first = self._vocab[key]
            if vocab and known and vocab != known:
                raise ValueError(f"{manifest.name} v{manifest.version} and {first} read namespace {ns!r} but were "
                                 "trained on different preparations (vocabularies differ); export them from runs "
                                 "of one preparation or load each preparation under its own namespace")
        self._by_model[key_model] = store
        return store

    async def check(self, timeout: float) -> tuple[bool, str]:
        """Every store reachable with an active (bulk-loaded) version: ``(ok, reason)``."""
        if not self._stores:
            return True, "no store opened yet"
        problems = []
        for (ns, _), store in list(self._stores.items()):
            try:
                version = await asyncio.wait_for(store.check_version(), timeout)
            except TimeoutError:
                problems.append(f"{ns}: no answer within {timeout * 1000:.0f} ms")
                continue
            except FeatureStoreError as exc:
                problems.append(f"{ns}: {exc}")
                continue
            if version is None:
                problems.append(f"{ns}: nothing bulk-loaded (no active version)")
        return (not problems), "; ".join(problems) or "ok"

    async def close(self) -> None:
        stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            with contextlib.suppress(Exception):  # closing a dead connection must not block shutdown
                await s.close()
