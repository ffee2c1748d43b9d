"""Codec, schema and item cache: no Redis needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ctrserve.contract.feature_map import FeatureInfo, FeatureMap
from ctrserve.contract.store_schema import StoreSchema
from ctrserve.feature_store.cache import ItemCache
from ctrserve.feature_store.codec import KIND_ITEM, KIND_USER, MAGIC, RowCodec, SequenceCodec
from ctrserve.feature_store.errors import CorruptValue

pytestmark = pytest.mark.quick


def test_row_codec_round_trip_and_layout() -> None:
    codec = RowCodec(KIND_ITEM, 2, 1)
    ints = np.array([[5, 2**31 - 1], [1, 0]])
    floats = np.array([[0.25], [-3.5]], dtype=np.float32)
    values = codec.encode_many(ints, floats)
    assert [len(v) for v in values] == [8 + 12, 8 + 12]
    assert values[0][:2] == MAGIC and values[0][3] == ord("I")
    assert values[0][8:12] == (5).to_bytes(4, "little")  # little-endian int32 right after the header
    got_i, got_f = codec.decode_many(values)
    np.testing.assert_array_equal(got_i, ints)
    np.testing.assert_array_equal(got_f, floats)


@pytest.mark.parametrize("bad", [b"", b"garbage", b"XX" + bytes(18), None])
def test_row_codec_rejects_malformed(bad: bytes | None) -> None:
    codec = RowCodec(KIND_ITEM, 2, 1)
    good = codec.encode([1, 2], [0.5])
    if bad is None:  # right length, but a user row where an item row belongs
        bad = RowCodec(KIND_USER, 2, 1).encode([1, 2], [0.5])
    with pytest.raises(CorruptValue, match="k1"):
        codec.decode_many([good, bad], key_of=lambda i: f"k{i}")


def test_row_codec_rejects_ids_outside_int32() -> None:
    with pytest.raises(ValueError, match="int32"):
        RowCodec(KIND_USER, 1, 0).encode([2**31], [])


def test_sequence_codec_round_trip_and_truncation_detected() -> None:
    codec = SequenceCodec(2)
    fields = np.array([[7, 3], [9, 4], [2, 2]])
    ts = np.array([4_000_000_000, 5, 0])  # beyond int32: stored as uint32
    value = codec.encode(fields, ts)
    assert len(value) == 8 + 3 * 3 * 4
    got, got_ts = codec.decode(value)
    np.testing.assert_array_equal(got, fields)
    np.testing.assert_array_equal(got_ts, ts)
    assert codec.decode(codec.encode(np.zeros((0, 2))))[0].shape == (0, 2)
    # an append (what the Lua script does) is a plain byte prepend after the header
    appended, appended_ts = codec.decode(value[:8] + codec.encode_event([1, 2], 3) + value[8:])
    np.testing.assert_array_equal(appended[0], [1, 2])
    np.testing.assert_array_equal(appended_ts[:2], [3, ts[0]])
    with pytest.raises(CorruptValue, match="seqkey"):
        codec.decode(value[:-2], key="seqkey")
    with pytest.raises(CorruptValue):
        SequenceCodec(3).decode(value)


def test_schema_from_feature_maps(tiny_fmap: FeatureMap) -> None:
    schema = StoreSchema.from_feature_map(tiny_fmap)
    assert schema.user_id_feature == "user_id"
    assert schema.item_id_feature == "item_id"
    assert schema.user_sparse == ["user_id", "segment"] and schema.user_dense == ["age"]
    assert schema.item_sparse == ["item_id", "cate_id"] and schema.item_dense == ["price", "quality"]
    assert [(s.fields, s.targets) for s in schema.sequences] == [(["hist_item_id", "hist_cate_id"],
                                                                  ["item_id", "cate_id"])]
    # no sequence (frappe-like): items are keyed by the first item-side sparse feature
    flat = FeatureMap(dataset="flat", label="y", user_id="u", features=[
        FeatureInfo(name="u", kind="sparse", side="user", dtype="int64"),
        FeatureInfo(name="item", kind="sparse", side="item", dtype="int64"),
        FeatureInfo(name="cost", kind="sparse", side="item", dtype="int64"),
        FeatureInfo(name="hour", kind="sparse", side="context", dtype="int64"),
    ])
    assert StoreSchema.from_feature_map(flat).item_id_feature == "item"
    with pytest.raises(ValueError, match="no item-side sparse feature"):
        StoreSchema.from_feature_map(flat, item_id_feature="hour")


def test_item_cache_lru_and_ttl() -> None:
    cache = ItemCache(max_size=2, ttl_s=10)
    cache.put("a", b"A", now=0)
    cache.put("b", b"B", now=0)
    assert cache.get_many(["a"], now=1) == [b"A"]  # "a" is now the most recent
    cache.put("c", b"C", now=1)  # evicts "b", the least recently used
    assert cache.get_many(["a", "b", "c"], now=2) == [b"A", None, b"C"]
    assert cache.get_many(["a"], now=10.5) == [None]  # expired
    assert (cache.hits, cache.misses) == (3, 2)
    assert ItemCache(0, 10).get_many(["a"], now=0) == [None]


def test_item_cache_metrics_register_in_another_registry() -> None:
    """The gateway serves its own registry; register_metrics puts the item-cache series there."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ctrserve.feature_store.cache import register_metrics

    registry = CollectorRegistry()
    register_metrics(registry)
    register_metrics(registry)  # idempotent
    ItemCache(4, 10).get_many(["x"], now=0)
    text = generate_latest(registry).decode()
    assert 'ctrserve_feature_store_item_cache_lookups_total{result="miss"}' in text
    assert "ctrserve_feature_store_item_cache_hit_ratio" in text


def test_feature_store_imports_no_torch() -> None:
    code = ("import sys; import ctrserve.feature_store.redis_store, ctrserve.feature_store.loader, "
            "ctrserve.feature_store.cli; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
