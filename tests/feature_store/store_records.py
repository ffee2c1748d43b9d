"""Records, stores and assertions shared by the Redis store tests (imported as a module, not
from conftest: a run given several test folders would import another folder's conftest)."""

from __future__ import annotations

import numpy as np
import redis

from ctrserve.feature_store import ItemRecords, RedisStoreConfig, SequenceSchema, StoreSchema, UserRecords
from ctrserve.feature_store.backends import open_store
from ctrserve.feature_store.redis_store import RedisOnlineStore

L = 5
SCHEMA = StoreSchema(
    dataset="t", user_id_feature="user_id", item_id_feature="item_id",
    user_sparse=["user_id", "segment"], user_dense=["age"],
    item_sparse=["item_id", "cate_id"], item_dense=["price"],
    sequences=[SequenceSchema(name="hist", fields=["hist_item_id", "hist_cate_id"],
                              targets=["item_id", "cate_id"], max_len=L)],
)


def make_records(seed: int) -> tuple[UserRecords, ItemRecords]:
    """4 users (history lengths 0, 2, 5, 3) and 6 items with seeded values."""
    rng = np.random.default_rng(seed)
    lengths = [0, 2, 5, 3]
    hist_item = np.zeros((4, L), np.int64)
    hist_cate = np.zeros((4, L), np.int64)
    ts = np.zeros((4, L), np.int64)
    for u, n in enumerate(lengths):
        hist_item[u, :n] = rng.integers(2, 100, n)
        hist_cate[u, :n] = rng.integers(2, 10, n)
        ts[u, :n] = 1_700_000_000 - np.arange(n) * 60  # most recent first
    users = UserRecords(
        ids=[f"u{i}" for i in range(4)],
        profile={"user_id": np.arange(2, 6), "segment": rng.integers(2, 8, 4),
                 "age": rng.normal(size=4).astype(np.float32)},
        sequences={"hist_item_id": hist_item, "hist_cate_id": hist_cate},
        timestamps={"hist": ts},
    )
    items = ItemRecords(ids=[f"i{i}" for i in range(6)], features={
        "item_id": np.arange(2, 8), "cate_id": rng.integers(2, 10, 6), "price": rng.normal(size=6).astype(np.float32)})
    return users, items


def make_store(url: str, schema: StoreSchema = SCHEMA, namespace: str = "t", **cfg: object) -> RedisOnlineStore:
    # generous budgets: the test machine is shared; the timeout test sets its own
    config = RedisStoreConfig(**{"url": url, "cleanup_grace_s": 0, "timeout_ms": 2000, "bulk_batch_size": 2, **cfg})
    return open_store(schema, config, namespace)


def raw_client(url: str) -> redis.Redis:
    """A plain sync client of the store's Redis: ``RedisCluster`` for a ``redis+cluster://`` URL."""
    if "+cluster://" in url:
        return redis.RedisCluster.from_url(url.replace("+cluster://", "://"))
    return redis.Redis.from_url(url)


def stored_keys(url: str, match: str) -> set[bytes]:
    """Every key matching ``match`` (on a cluster: on every master)."""
    with raw_client(url) as client:
        if isinstance(client, redis.RedisCluster):
            return set(client.scan_iter(match=match, target_nodes=redis.RedisCluster.PRIMARIES))
        return set(client.scan_iter(match=match))


def assert_user(got, users: UserRecords, u: int) -> None:
    assert not got.user_missing and not got.profile_missing
    for f in ("user_id", "segment", "age"):
        np.testing.assert_array_equal(got.user[f], users.profile[f][u])
    np.testing.assert_array_equal(got.sequence["hist_item_id"], users.sequences["hist_item_id"][u])
    np.testing.assert_array_equal(got.sequence["hist_cate_id"], users.sequences["hist_cate_id"][u])
    np.testing.assert_array_equal(got.timestamps["hist"], users.timestamps["hist"][u])
    assert got.sequence_length["hist"] == int((users.sequences["hist_item_id"][u] != 0).sum())


def assert_items(got, items: ItemRecords, idx: list[int]) -> None:
    for f, col in items.features.items():
        np.testing.assert_array_equal(got.items[f], col[idx])
        assert got.items[f].dtype == (np.float32 if f == "price" else np.int64)


def version_keys(url: str, ns: str = "ctrserve:fs:t") -> set[int]:
    return {int(k.split(b":")[3][1:]) for k in stored_keys(url, f"{ns}:v*")}


