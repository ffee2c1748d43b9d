"""Tensor assembly: shapes and dtypes from the manifest, stored values, encoded overrides, cold start."""

from __future__ import annotations

import numpy as np
import pytest
from gateway_toy import L, MemoryStore, toy_manifest

from ctrserve.contract.feature_map import OOV_ID, PAD_ID
from ctrserve.contract.store_schema import StoreSchema
from ctrserve.service.assemble import Assembler, AssemblyError

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def assembler() -> Assembler:
    from gateway_toy import VOCAB

    return Assembler(toy_manifest(), VOCAB)


async def _stored(user: str, items: list[str]):
    return await MemoryStore(StoreSchema.from_feature_map(toy_manifest().feature_map)).online_read(user, items)


async def test_shapes_dtypes_and_stored_values(assembler: Assembler) -> None:
    items = ["10", "11", "12"]
    out = assembler.assemble("u1", items, await _stored("u1", items), {"device": 1, "hour": 13})
    manifest = toy_manifest()
    assert list(out) == [t.name for t in manifest.inputs]
    for t in manifest.inputs:
        want = tuple(3 if d == -1 else d for d in t.shape)
        assert out[t.name].shape == want, t.name
        assert out[t.name].dtype == np.dtype(t.dtype), t.name
    assert out["user_id"].tolist() == [2] and out["segment"].tolist() == [3]
    assert out["age"].tolist() == [0.5]
    assert out["hist_item_id"].tolist() == [[3, 4, 0, 0, 0]]
    assert out["item_id"].tolist() == [2, 3, 4]
    assert out["price"].tolist() == [0.25, -0.5, 1.5]
    assert out["device"].tolist() == [3, 3, 3]  # "1" is the second vocabulary value -> id 3
    assert out["hour"].tolist() == [4, 4, 4]  # 13 >= 12: bucket 2 -> id 4


async def test_overrides_are_encoded_like_prepare(assembler: Assembler) -> None:
    items = ["10", "11"]
    ctx = {"age": 50, "segment": "s0", "hist_item_id": ["13", "10", "999"], "hist_cate_id": ["c", "a", None],
           "device": None, "hour": 23.5}
    feats = [{"price": float(np.e - 1), "cate_id": "zzz"}, {"device": 2, "hour": 0}]
    out = assembler.assemble("u1", items, await _stored("u1", items), ctx, feats)
    assert out["age"].tolist() == [pytest.approx(2.0)]  # (50 - 30) / 10
    assert out["segment"].tolist() == [2]
    assert out["hist_item_id"].tolist() == [[5, 2, OOV_ID, PAD_ID, PAD_ID]]
    assert out["hist_cate_id"].tolist() == [[4, 2, PAD_ID, PAD_ID, PAD_ID]]
    assert out["price"][0] == pytest.approx(0.0, abs=1e-6)  # log1p(e - 1) = 1 -> (1 - 1) / 2
    assert out["price"][1] == pytest.approx(-0.5)  # stored value kept
    assert out["cate_id"].tolist() == [OOV_ID, 3]
    assert out["device"].tolist() == [PAD_ID, 4]  # request-wide null, then candidate override "2"
    assert out["hour"].tolist() == [5, 2]


async def test_long_sequence_override_keeps_the_newest(assembler: Assembler) -> None:
    hist = ["10", "11", "12", "13", "10", "11", "12"]
    out = assembler.assemble("u1", ["10"], await _stored("u1", ["10"]),
                             {"hist_item_id": hist, "hist_cate_id": ["a"] * len(hist)})
    assert out["hist_item_id"].shape == (1, L)
    assert out["hist_item_id"].tolist() == [[2, 3, 4, 5, 2]]


async def test_cold_start_user_and_items(assembler: Assembler) -> None:
    items = ["10", "13", "nope"]
    stored = await _stored("u3", items)  # u3 is in the vocabulary but not in the store
    out = assembler.assemble("u3", items, stored)
    assert out["user_id"].tolist() == [4]  # encoded from the raw id, not OOV
    assert out["segment"].tolist() == [OOV_ID] and out["age"].tolist() == [0.0]
    assert out["hist_item_id"].tolist() == [[0] * L]
    assert out["item_id"].tolist() == [2, 5, OOV_ID]  # "13" missing from the store but in the vocabulary
    assert out["cate_id"].tolist() == [2, OOV_ID, OOV_ID]


def test_degraded_features(assembler: Assembler) -> None:
    stored = assembler.cold_start("u2", ["11", "x"])
    out = assembler.assemble("u2", ["11", "x"], stored)
    assert out["user_id"].tolist() == [3] and out["item_id"].tolist() == [3, OOV_ID]
    assert out["price"].tolist() == [0.0, 0.0]


async def test_stored_history_of_another_length_is_fitted(assembler: Assembler) -> None:
    stored = await _stored("u1", ["10"])
    stored.sequence["hist_item_id"] = np.arange(1, 9)
    stored.sequence["hist_cate_id"] = np.array([2])
    out = assembler.assemble("u1", ["10"], stored)
    assert out["hist_item_id"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["hist_cate_id"].tolist() == [[2, 0, 0, 0, 0]]


@pytest.mark.parametrize(("context", "features", "message"), [
    ({"nope": 1}, None, r"context sets unknown features \['nope'\]"),
    ({"item_id": "10"}, None, "unknown features"),  # item features are per candidate
    (None, [{"age": 3}], r"candidates\[0\].features sets unknown features \['age'\]"),
    ({"hist_item_id": ["10"]}, None, "partially"),
])
def test_unknown_or_partial_keys(assembler: Assembler, context, features, message) -> None:
    with pytest.raises(AssemblyError, match=message):
        assembler.check_keys(context, features or [None])


@pytest.mark.parametrize(("context", "message"), [
    ({"age": "old"}, "expected a number"),
    ({"hour": "noon"}, "expected a number"),
    ({"segment": ["s0"]}, "expected one value"),
    ({"hist_item_id": "10", "hist_cate_id": "a"}, "expected a list"),
])
async def test_bad_values(assembler: Assembler, context, message) -> None:
    with pytest.raises(AssemblyError, match=message):
        assembler.assemble("u1", ["10"], await _stored("u1", ["10"]), context)


def test_nothing_model_specific_is_hard_coded() -> None:
    """Rename every input: the assembler follows the manifest."""
    m = toy_manifest()
    fmap = m.feature_map.model_copy(deep=True)
    for f in fmap.features:
        f.name = "x_" + f.name
    m = m.model_copy(update={"feature_map": fmap, "inputs": [t.model_copy(update={"name": "x_" + t.name})
                                                             for t in m.inputs]})
    a = Assembler(m, {})
    w = a.warmup_inputs(7)
    assert set(w) == {"x_" + t for t in ("user_id", "segment", "age", "hist_item_id", "hist_cate_id", "item_id",
                                        "cate_id", "price", "device", "hour")}
    assert w["x_item_id"].shape == (7,) and w["x_hist_item_id"].shape == (1, L) and w["x_age"].dtype == np.float32
