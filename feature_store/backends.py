"""The store backend a configuration names: ``redis+cluster://`` URLs the Redis Cluster one, every
other URL the single-node (or replicated) Redis one. Backends are imported on first use (redis-py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctrserve.contract.store_schema import StoreSchema

from .config import RedisStoreConfig

if TYPE_CHECKING:
    from .redis_store import RedisOnlineStore


def store_class(config: RedisStoreConfig) -> type[RedisOnlineStore]:
    """``RedisClusterOnlineStore`` for a cluster URL, else ``RedisOnlineStore``."""
    if config.cluster:
        from .redis_cluster_store import RedisClusterOnlineStore

        return RedisClusterOnlineStore
    from .redis_store import RedisOnlineStore

    return RedisOnlineStore


def open_store(schema: StoreSchema, config: RedisStoreConfig, namespace: str | None = None,
               vocab_sha256: str | None = None) -> RedisOnlineStore:
    """The store for ``config`` (see ``store_class``)."""
    return store_class(config)(schema, config, namespace, vocab_sha256)
