"""The gateway's view of the feature store: one online store per (namespace, schema), shared by
every served model that reads it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from ctrserve.export.manifest import Manifest
from ctrserve.feature_store.base import OnlineStore
from ctrserve.feature_store.config import RedisStoreConfig
from ctrserve.feature_store.errors import FeatureStoreError
from ctrserve.feature_store.schema import StoreSchema

StoreFactory = Callable[[StoreSchema, str], OnlineStore]


def redis_factory(config: RedisStoreConfig) -> StoreFactory:
    def make(schema: StoreSchema, namespace: str) -> OnlineStore:
        from ctrserve.feature_store.redis_store import RedisOnlineStore

        return RedisOnlineStore(schema, config, namespace=namespace)

    return make


def namespace_of(manifest: Manifest, override: str | None = None) -> str:
    """The namespace a model's features were bulk-loaded under: the override, else the name of
    the prepared directory its run used (``ctrserve store load``'s default), else the dataset."""
    if override:
        return override
    try:
        prepared = (Path(manifest.run_dir) / "prepared_dir.txt").read_text().strip()
        if prepared:
            return Path(prepared).name
    except OSError:
        pass  # exported elsewhere (a serving image has no run directories)
    return manifest.dataset


class FeatureStores:
    def __init__(self, factory: StoreFactory, namespace: str | None = None):
        self._factory = factory
        self._namespace = namespace
        self._stores: dict[tuple[str, str], OnlineStore] = {}
        self._by_model: dict[tuple[str, int], OnlineStore] = {}

    def for_model(self, manifest: Manifest) -> OnlineStore:
        key_model = (manifest.name, manifest.version)
        store = self._by_model.get(key_model)
        if store is not None:
            return store
        schema = StoreSchema.from_feature_map(manifest.feature_map)
        ns = namespace_of(manifest, self._namespace)
        key = (ns, schema.to_json())
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = self._factory(schema, ns)
        self._by_model[key_model] = store
        return store

    async def check(self, timeout: float) -> tuple[bool, str]:
        """Every store reachable with an active (bulk-loaded) version: ``(ok, reason)``."""
        if not self._stores:
            return True, "no store opened yet"
        problems = []
        for (ns, _), store in list(self._stores.items()):
            try:
                version = await asyncio.wait_for(_active_version(store), timeout)
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


async def _active_version(store: OnlineStore) -> int | None:
    fn = getattr(store, "active_version", None)
    if fn is None:  # a store without versions is reachable if it answers a read
        await store.online_read("__readyz__", [])
        return 0
    return await fn()
