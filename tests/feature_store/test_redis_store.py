"""The Redis store against a real redis-server (fixture ``redis_url`` in tests/conftest.py); the
tests taking ``store_url`` run on the single server and again on a local Redis Cluster."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import redis
from store_records import (
    SCHEMA,
    L,
    assert_items,
    assert_user,
    make_records,
    make_store,
    raw_client,
    stored_keys,
    version_keys,
)

from ctrserve.contract.feature_map import OOV_ID
from ctrserve.feature_store import (
    CorruptValue,
    ItemRecords,
    RedisStoreConfig,
    SchemaMismatch,
    StoreNotLoaded,
    StoreTimeout,
    StoreUnavailable,
    UserRecords,
)
from ctrserve.feature_store.backends import open_store
from ctrserve.feature_store.redis_store import RedisOnlineStore

pytestmark = pytest.mark.redis


async def test_round_trip_profiles_sequences_items(store_url: str) -> None:
    users, items = make_records(0)
    async with make_store(store_url) as store:
        version = await store.bulk_load(users, items)
        for u in range(4):
            got = await store.online_read(f"u{u}", ["i3", "i0", "i5", "i3"])
            assert got.version == version
            assert_user(got, users, u)
            assert_items(got, items, [3, 0, 5, 3])
            assert got.missing_items.size == 0
        assert (await store.online_read("u0", [])).sequence_length["hist"] == 0  # stored, empty history


async def test_missing_user_and_items_get_cold_start_defaults(store_url: str) -> None:
    users, items = make_records(0)
    async with make_store(store_url) as store:
        await store.bulk_load(users, items)
        got = await store.online_read("nobody", ["i1", "no-such-item", "i2"])
    assert got.user_missing and got.profile_missing
    assert got.user["user_id"] == OOV_ID and got.user["segment"] == OOV_ID and got.user["age"] == 0.0
    assert got.sequence_length["hist"] == 0 and not got.sequence["hist_item_id"].any()
    assert got.sequence["hist_item_id"].shape == (L,)
    np.testing.assert_array_equal(got.missing_items, [1])
    np.testing.assert_array_equal(got.items["item_id"], [items.features["item_id"][1], OOV_ID,
                                                         items.features["item_id"][2]])
    assert got.items["price"][1] == 0.0


async def test_append_trims_to_max_len_atomically(store_url: str) -> None:
    users, items = make_records(0)
    async with make_store(store_url) as store:
        await store.bulk_load(users, items)
        before = users.sequences["hist_item_id"][3][:3]
        for k in range(4):  # 3 + 4 events, L = 5: the two oldest fall off
            n = await store.append_event("u3", f"i{k}", ts=1_800_000_000 + k)
            assert n == min(3 + k + 1, L)
        got = await store.online_read("u3", [])
        np.testing.assert_array_equal(got.sequence["hist_item_id"], [5, 4, 3, 2, before[0]])  # item_id of i3..i0
        np.testing.assert_array_equal(got.sequence["hist_cate_id"][:4], items.features["cate_id"][3::-1])
        np.testing.assert_array_equal(got.timestamps["hist"][:4], [1_800_000_003, 1_800_000_002, 1_800_000_001,
                                                                   1_800_000_000])
        # concurrent appends from many clients: none lost mid-way, never longer than L
        stamps = list(range(1_900_000_000, 1_900_000_030))
        await asyncio.gather(*(store.append_event("u1", fields={"hist_item_id": 9, "hist_cate_id": 3}, ts=t)
                               for t in stamps))
        got = await store.online_read("u1", [])
        assert got.sequence_length["hist"] == L
        assert set(got.timestamps["hist"].tolist()) <= set(stamps)
        # a new user gets a sequence but no profile; an unknown item gives OOV fields
        assert await store.append_event("fresh", "no-such-item", ts=5) == 1
        got = await store.online_read("fresh", [])
        assert got.profile_missing and not got.user_missing
        assert got.sequence["hist_item_id"][0] == OOV_ID and got.sequence_length["hist"] == 1
        with pytest.raises(ValueError, match="exactly"):
            await store.append_event("u1", fields={"hist_item_id": 2})


async def test_writes_land_on_the_keys_keys_py_names(store_url: str) -> None:
    """Bulk writes (built in Python) and online writes (built by the Lua scripts) use one layout."""
    users, items = make_records(0)
    one_user = UserRecords(ids=users.ids[:1], profile={f: c[:1] for f, c in users.profile.items()},
                           sequences={f: c[:1] for f, c in users.sequences.items()},
                           timestamps={n: c[:1] for n, c in users.timestamps.items()})
    one_item = ItemRecords(ids=items.ids[:1], features={f: c[:1] for f, c in items.features.items()})
    async with make_store(store_url) as store:
        version = await store.bulk_load(one_user, one_item)
        keys = store.keys.version(version)
        await store.put_user("pu", {"user_id": 7, "segment": 3, "age": 0.5})
        await store.put_item("pi", {"item_id": 3, "cate_id": 9, "price": 1.5})
        await store.append_event("pu", fields={"hist_item_id": 2, "hist_cate_id": 2}, ts=1)
        stored = {k.decode() for k in stored_keys(store_url, store.keys.scan_pattern)}
        with raw_client(store_url) as client:
            assert client.get(store.keys.active) == str(version).encode()
    assert stored == {keys.meta, keys.user("u0"), keys.sequence("hist", "u0"), keys.item("i0"),
                      keys.user("pu"), keys.sequence("hist", "pu"), keys.item("pi")}


async def test_put_item_and_cache(store_url: str) -> None:
    from prometheus_client import REGISTRY

    def hits() -> float:
        return REGISTRY.get_sample_value("ctrserve_feature_store_item_cache_lookups_total", {"result": "hit"}) or 0

    users, items = make_records(0)
    async with make_store(store_url) as store:
        await store.bulk_load(users, items)
        first = await store.online_read("u1", ["i0", "i1", "i2"])
        assert first.item_cache_hits == 0
        h0 = hits()
        second = await store.online_read("u2", ["i2", "i1", "i4"])
        assert second.item_cache_hits == 2 and hits() - h0 == 2
        assert_items(second, items, [2, 1, 4])
        await store.put_item("i1", {"item_id": 3, "cate_id": 9, "price": 1.5})
        await store.put_item("brand-new", {"item_id": 40, "cate_id": 2, "price": -0.5})
        got = await store.online_read("u2", ["i1", "brand-new"])
        np.testing.assert_array_equal(got.items["cate_id"], [9, 2])
        np.testing.assert_array_equal(got.items["price"], np.float32([1.5, -0.5]))
        with pytest.raises(ValueError, match="exactly"):
            await store.put_item("x", {"item_id": 3})
    assert 0 < store.item_cache.hit_ratio < 1


async def test_crash_mid_load_keeps_previous_version_serving(store_url: str) -> None:
    old_users, old_items = make_records(1)
    new_users, new_items = make_records(2)
    async with make_store(store_url) as store, make_store(store_url) as reader:
        v1 = await store.bulk_load(old_users, old_items)
        assert_user(await reader.online_read("u1", ["i0"]), old_users, 1)

        batches = []

        def crash_after_two_batches(n: int) -> None:
            batches.append(n)
            if len(batches) == 2:
                raise RuntimeError("simulated crash mid-load")

        with pytest.raises(RuntimeError, match="simulated crash"):
            await store.bulk_load(new_users, new_items, progress=crash_after_two_batches)
        assert await store.active_version() == v1
        assert version_keys(store_url) == {v1, v1 + 1}  # half a load written ...
        for u in range(4):  # ... but readers still see only the old version, u0 and u1 included
            got = await reader.online_read(f"u{u}", ["i0", "i5"])
            assert got.version == v1
            assert_user(got, old_users, u)
            assert_items(got, old_items, [0, 5])

        v3 = await store.bulk_load(new_users, new_items)
        assert version_keys(store_url) == {v3}  # the old and the crashed versions are gone
        got = await reader.online_read("u2", ["i0", "i5"])  # the reader notices the flip at once
        assert got.version == v3
        assert_user(got, new_users, 2)
        assert_items(got, new_items, [0, 5])  # not stale values from the item cache


async def test_no_active_version_and_online_writes_create_one(store_url: str) -> None:
    async with make_store(store_url) as store:
        with pytest.raises(StoreNotLoaded, match="store load"):
            await store.online_read("u1", ["i1"])
        await store.put_user("u1", {"user_id": 7, "segment": 3, "age": 0.5})
        got = await store.online_read("u1", [])
        assert got.user["user_id"] == 7 and not got.profile_missing
        users, items = make_records(0)
        await store.online_write_batch(users, items)
        assert_user(await store.online_read("u2", []), users, 2)


async def test_schema_mismatch_is_detected(store_url: str) -> None:
    users, items = make_records(0)
    other = SCHEMA.model_copy(update={"user_dense": []})
    async with make_store(store_url) as store, make_store(store_url, other) as wrong:
        await store.bulk_load(users, items)
        with pytest.raises(SchemaMismatch, match="user_dense"):
            await wrong.online_read("u1", [])


async def test_vocabulary_mismatch_is_detected(store_url: str) -> None:
    """Same schema, another preparation: a reader told the model's vocabulary hash refuses the
    version (reads and the readiness check), a reader with the right hash or none serves it."""
    users, items = make_records(0)
    config = RedisStoreConfig(url=store_url, cleanup_grace_s=0, timeout_ms=2000)
    async with make_store(store_url) as store:
        await store.bulk_load(users, items, vocab_sha256="a" * 64, source="/work/processed/t-other")
    async with open_store(SCHEMA, config, "t", vocab_sha256="b" * 64) as wrong:
        with pytest.raises(SchemaMismatch, match="t-other.*vocabulary"):
            await wrong.online_read("u1", [])
        with pytest.raises(SchemaMismatch, match="vocabulary"):
            await wrong.check_version()
    async with open_store(SCHEMA, config, "t", vocab_sha256="a" * 64) as right:
        assert await right.check_version() is not None
        assert_user(await right.online_read("u1", []), users, 1)


async def test_malformed_values_raise_corrupt_value(store_url: str) -> None:
    users, items = make_records(0)
    async with make_store(store_url) as store:
        version = await store.bulk_load(users, items)
        keys = store.keys.version(version)
        with raw_client(store_url) as client:
            client.set(keys.item("i2"), b"not a feature row")
            client.set(keys.user("u1"), b"CT\x01U" + bytes(40))
            client.set(keys.sequence("hist", "u2"), store.codec.sequences["hist"].header + b"\x01\x02\x03")
        with pytest.raises(CorruptValue, match=re.escape(keys.item("i2"))):
            await store.online_read("u0", ["i1", "i2"])
        with pytest.raises(CorruptValue, match=re.escape(keys.user("u1"))):
            await store.online_read("u1", [])
        with pytest.raises(CorruptValue, match=re.escape(keys.sequence("hist", "u2"))):
            await store.online_read("u2", [])
        with pytest.raises(CorruptValue, match=re.escape(keys.sequence("hist", "u2"))):
            await store.append_event("u2", fields={"hist_item_id": 2, "hist_cate_id": 2})
        assert_user(await store.online_read("u3", ["i1"]), users, 3)  # the rest still reads
        with raw_client(store_url) as client:
            client.set(store.keys.active, b"junk")
        with pytest.raises(CorruptValue, match="active"):
            await store.online_read("u3", [])


async def test_redis_stopped_gives_typed_error_then_recovers(redis_server, redis_url: str) -> None:
    users, items = make_records(0)
    async with make_store(redis_url) as store:
        await store.bulk_load(users, items)
        await store.online_read("u1", ["i1"])  # pooled connections exist when the server goes away
        with redis.Redis.from_url(redis_url) as client:
            client.save()  # --save "" disables automatic snapshots; this one survives the restart
        redis_server.stop()
        try:
            with pytest.raises(StoreUnavailable, match="cannot reach"):
                await store.online_read("u1", ["i1"])
            with pytest.raises(StoreUnavailable):
                await store.append_event("u1", fields={"hist_item_id": 2, "hist_cate_id": 2})
        finally:
            redis_server.start()
        got = await store.online_read("u1", ["i1"])  # the same store object reconnects
        assert_user(got, users, 1)


async def test_connection_refused_and_timeout(redis_url: str) -> None:
    async with make_store("redis://127.0.0.1:1/0") as dead:
        with pytest.raises(StoreUnavailable, match="cannot reach"):
            await dead.online_read("u1", ["i1"])
    users, items = make_records(0)
    async with make_store(redis_url, timeout_ms=100) as store:
        await store.bulk_load(users, items)
        with redis.Redis.from_url(redis_url) as client:
            client.execute_command("CLIENT", "PAUSE", "600", "ALL")  # the server stops answering for 0.6 s
        with pytest.raises(StoreTimeout, match="100 ms"):
            await store.online_read("u1", ["i1"])
        await asyncio.sleep(0.7)
        assert_user(await store.online_read("u1", ["i1"]), users, 1)


async def test_bulk_load_from_prepared_dataset(redis_url: str, tiny_prepared: Path) -> None:
    from ctrserve.contract.prepared import load_split
    from ctrserve.feature_store.loader import load_prepared

    config = RedisStoreConfig(url=redis_url, cleanup_grace_s=0, timeout_ms=2000, bulk_batch_size=50)
    version, rec = await load_prepared(tiny_prepared, config, "tiny")
    assert rec.skipped_user_rows > 0  # users below min_count have no raw id in the vocabulary
    splits = {s: load_split(tiny_prepared, s) for s in ("train", "valid", "test")}
    vocab = __import__("json").loads((tiny_prepared / "vocab.json").read_text())
    async with RedisOnlineStore(rec.schema, config, "tiny") as store:
        checked = 0
        for raw_user in vocab["user_id"][:40]:
            enc = vocab["user_id"].index(raw_user) + 2
            split = next(s for s in ("test", "valid", "train") if (splits[s]["user_id"] == enc).any())
            row = np.flatnonzero(splits[split]["user_id"] == enc)[-1]  # latest row of the latest split
            item_enc = int(splits[split]["item_id"][row])
            raw_item = vocab["item_id"][item_enc - 2] if item_enc >= 2 else "unknown-item"
            got = await store.online_read(raw_user, [raw_item])
            assert not got.user_missing and got.version == version
            for f in ("hist_item_id", "hist_cate_id"):
                np.testing.assert_array_equal(got.sequence[f], splits[split][f][row])
            np.testing.assert_array_equal(got.user["segment"], splits[split]["segment"][row])
            np.testing.assert_allclose(got.user["age"], splits[split]["age"][row])
            if item_enc >= 2:
                for f in ("item_id", "cate_id", "price", "quality"):
                    np.testing.assert_allclose(got.items[f][0], splits[split][f][row])
                checked += 1
        assert checked > 10
        keys_before = version_keys(redis_url, "ctrserve:fs:tiny")
        again, _ = await load_prepared(tiny_prepared, config, "tiny")  # idempotent rerun: same data, new version
        assert again == version + 1 and keys_before == {version}
        assert version_keys(redis_url, "ctrserve:fs:tiny") == {again}
        got = await store.online_read(vocab["user_id"][0], [])
        assert got.version == again and not got.user_missing


def test_cli_load_append_and_inspect(store_url: str, tiny_prepared: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from ctrserve.cli import app

    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "tinycli").symlink_to(tiny_prepared)
    monkeypatch.setenv("CTRSERVE_WORK_DIR", str(tmp_path))
    monkeypatch.setenv("CTRSERVE_REDIS_CLEANUP_GRACE_S", "0")
    runner = CliRunner()
    common = ["--dataset", "tinycli", "--redis-url", store_url]
    res = runner.invoke(app, ["store", "load", *common])
    assert res.exit_code == 0, res.output
    assert "version 1" in res.output
    vocab = json.loads((tiny_prepared / "vocab.json").read_text())
    user, item = vocab["user_id"][0], vocab["item_id"][0]
    res = runner.invoke(app, ["store", "append-event", *common, "--user-id", user, "--item-id", item, "--ts", "77"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["store", "get-user", *common, "--user-id", user, "--events", "2"])
    assert res.exit_code == 0, res.output
    assert "hist_item_id: [2," in res.output and "ts: [77," in res.output
    res = runner.invoke(app, ["store", "put-item", *common, "--item-id", "x", "--set", "item_id=3"])
    assert res.exit_code == 2 and "needs exactly" in res.output
    res = runner.invoke(app, ["store", "get-user", "--dataset", "absent", "--redis-url", store_url,
                              "--user-id", user])
    assert res.exit_code == 1 and "StoreNotLoaded" in res.output
