"""Codec, schema and item cache: no Redis needed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def _documented_keys() -> list[str]:
    """The key column of docs/feature_store.md's key-layout table."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "feature_store.md").read_text()
    section = text.split("## Key layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(ns:[^`]+)` \|", section, flags=re.M)


def test_key_names_are_the_documented_layout() -> None:
    from ctrserve.feature_store.keys import Keys, item_suffix, sequence_suffix, user_suffix

    documented = _documented_keys()
    assert len(documented) == 10, documented  # 7 keys, then the 3 the cluster layout tags
    fill = {"<v>": "7", "<user_id>": "u1", "<sequence>": "hist", "<item_id>": "i9"}

    def expected(templates: list[str]) -> set[str]:
        out = set()
        for template in templates:
            for slot, value in fill.items():
                template = template.replace(slot, value)
            out.add(template.replace("ns:", "ctrserve:fs:t:", 1))
        return out

    keys = Keys("ctrserve:fs", "t")
    v7 = keys.version(7)
    built = {keys.active, keys.next_version, keys.loading(7), keys.meta(7), v7.user("u1"),
             v7.sequence("hist", "u1"), v7.item("i9")}
    assert built == expected(documented[:7])
    tagged = Keys("ctrserve:fs", "t", tagged=True).version(7)
    assert {tagged.user("u1"), tagged.sequence("hist", "u1"), tagged.item("i9")} == expected(documented[7:])
    for suffix, key in [(user_suffix("u1", True), tagged.user("u1")), (item_suffix("i9", True), tagged.item("i9")),
                        (sequence_suffix("hist", "u1", True), tagged.sequence("hist", "u1"))]:
        assert f"{keys.ns}:v7:{suffix}" == key
    assert v7.items(["a", "b"]) == [v7.item("a"), v7.item("b")]
    # the Lua scripts build ns + ":v" + version + ":" + suffix: the same names
    for suffix, key in [(user_suffix("u1"), v7.user("u1")), (sequence_suffix("hist", "u1"), v7.sequence("hist", "u1")),
                        (item_suffix("i9"), v7.item("i9"))]:
        assert f"{keys.ns}:v7:{suffix}" == key
    assert [keys.version_of(k) for k in (v7.item("i9"), v7.meta, keys.active, keys.loading(7))] == [7, 7, None, None]
    assert keys.version_of(v7.user("u1").encode()) == 7
    assert Keys("p", "a*b[1]").scan_pattern == r"p:a\*b\[1\]:v*"


def test_key_names_are_spelled_only_in_keys_py() -> None:
    """Every key of the layout is built by keys.py: no other module of the package spells a
    ``"u:"``/``"s:"``/``"i:"`` prefix or a ``:v`` version segment."""
    package = Path(__file__).resolve().parents[2] / "feature_store"
    literal = re.compile(r"""["'][usi]:["']|["']:v["']|f["'][^"']*:v\{""")
    offenders = [f"{p.name}:{n}" for p in sorted(package.glob("*.py")) if p.name != "keys.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders, offenders
    assert literal.search('base + "u:" + user_id') and literal.search('f"{ns}:v{version}:"')


def test_online_store_interface_is_small() -> None:
    """``check_version`` is part of the contract; the blocking reader is an optional capability."""
    from ctrserve.feature_store.base import BlockingReader, OnlineStore, PendingRead

    class NoVersions(OnlineStore):
        async def online_write_batch(self, users=None, items=None, progress=None) -> None: ...
        async def online_read(self, user_id, item_ids): ...
        async def close(self) -> None: ...

    with pytest.raises(TypeError, match="check_version"):
        NoVersions()

    class Versions(NoVersions):
        async def check_version(self) -> int | None:
            return None

    assert Versions().blocking_reader() is None

    class Answer(PendingRead):
        def result(self):
            return "features"

        def cancel(self) -> None: ...

    class Reader(BlockingReader):
        timeout_s = 0.1
        saturated = False

        def begin(self, user_id, item_ids):
            return None if user_id == "unadopted" else Answer()

    assert Reader().read("u1", []) == "features" and Reader().read("unadopted", []) is None
