"""Semantic IDs (models/data/semantic_ids.py): planted structure on hand-made splits (quick), the
spec options, and a prepared dataset whose item id only keys the store (``replace``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.store_schema import StoreSchema
from ctrserve.models.data.prepare import apply_overrides, prepare
from ctrserve.models.data.semantic_ids import (
    UNKNOWN_CODE,
    add_semantic_ids,
    assign_codes,
    hold_out_fit_users,
    residual_kmeans,
)
from ctrserve.models.data.spec import SpecError, load_spec, parse_spec

pytestmark = pytest.mark.quick

SPEC = {
    "name": "toy", "loader": "none", "label": "label", "user_id": "user",
    "features": [{"name": "user", "type": "sparse", "side": "user"},
                 {"name": "item", "type": "sparse", "side": "item"},
                 {"name": "cate", "type": "sparse", "side": "item"}],
    "semantic_ids": {"item": "item", "attributes": ["cate"], "levels": 2, "codebook": 2, "dim": 4,
                     "content_dim": 2, "mode": "add"},
}


def planted_splits(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Two worlds: users 0-19 click items a0..a9 (category A), users 20-39 items b0..b9 (category
    B). Item a_cold (category A) and item z_cold (no category) occur only in test."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        world = "a" if u < 20 else "b"
        for i in rng.choice(10, 6, replace=False):
            rows.append((f"u{u}", f"{world}{i}", world.upper(), 1.0))
    users, items, cates, labels = (np.array(c) for c in zip(*rows, strict=True))
    train = {"user": users, "item": items, "cate": cates, "label": labels.astype(np.float32)}
    test = {"user": np.array(["u0", "u1"]), "item": np.array(["a_cold", "z_cold"]),
            "cate": np.array(["A", ""]), "label": np.array([1.0, 0.0], np.float32)}
    return {"train": train, "valid": {k: v[:4] for k, v in train.items()}, "test": test}


def test_items_of_one_world_share_the_first_code_and_the_two_worlds_differ() -> None:
    spec = parse_spec(SPEC)
    table, report = assign_codes(spec, planted_splits(), spec.semantic_ids)
    first = {item: codes[0] for item, codes in table.items()}
    a = {first[f"a{i}"] for i in range(10)}
    b = {first[f"b{i}"] for i in range(10)}
    assert len(a) == 1 and len(b) == 1 and a != b, (a, b)
    assert report.warm_items == 20 and report.cold_items == 2
    # a_cold has category A: the codes of its nearest item by content, a world-A item
    assert table["a_cold"] in [table[f"a{i}"] for i in range(10)]
    assert table["z_cold"] == [UNKNOWN_CODE] * 2
    assert (report.cold_by_neighbour, report.cold_unknown) == (1, 1)


def test_codes_are_deterministic_for_a_seed() -> None:
    spec = parse_spec(SPEC)
    first, _ = assign_codes(spec, planted_splits(), spec.semantic_ids)
    again, _ = assign_codes(spec, planted_splits(), spec.semantic_ids)
    assert first == again


def test_residual_kmeans_explains_more_with_every_level() -> None:
    x = np.random.default_rng(1).normal(size=(300, 6))
    codes, left = residual_kmeans(x, levels=3, codebook=8, seed=0)
    assert codes.shape == (300, 3) and codes.max() < 8
    assert 1.0 > left[0] > left[1] > left[2] > 0.0
    # the residual left after level 1 is exactly what k-means' inertia says
    from sklearn.cluster import KMeans
    km = KMeans(8, n_init=3, random_state=0).fit(x)
    assert left[0] == pytest.approx(km.inertia_ / float((x**2).sum()), abs=1e-4)


def test_replace_drops_the_item_input_and_add_keeps_it() -> None:
    for mode, has_item in (("add", True), ("replace", False)):
        spec = parse_spec({**SPEC, "semantic_ids": {**SPEC["semantic_ids"], "mode": mode}})
        new, raw, _ = add_semantic_ids(spec, planted_splits())
        names = [f.name for f in new.features]
        assert names[:3] == ["user", "sid_1", "sid_2"] and ("item" in names) is has_item
        assert new.semantic_ids is None  # applied
        assert raw["test"]["sid_1"].tolist()[1] == UNKNOWN_CODE


def test_semantic_id_overrides_set_the_spec_block_and_bad_ones_are_named() -> None:
    spec = load_spec("synthetic")
    assert spec.semantic_ids is not None and spec.semantic_ids.mode == "off"
    assert apply_overrides(spec, {"semantic_ids": {"mode": "replace"}}).semantic_ids.mode == "replace"
    assert apply_overrides(spec, {"semantic_ids.levels": 3}).semantic_ids.levels == 3
    with pytest.raises(SpecError, match="mode"):
        apply_overrides(spec, {"semantic_ids": {"mode": "sometimes"}})
    with pytest.raises(SpecError, match="no semantic_ids block"):
        apply_overrides(load_spec("criteo_sample"), {"semantic_ids.mode": "add"})


def test_replace_mode_keys_the_store_by_the_raw_item_id(tmp_path: Path) -> None:
    out = tmp_path / "synthetic-sid"
    prepare("synthetic", tmp_path, out, {"n_rows": 2000, "n_users": 200, "n_items": 150, "n_cates": 8,
                                         "max_len": 6, "semantic_ids": {"mode": "replace"}})
    fmap = FeatureMap.load(out / "feature_map.json")
    inputs = fmap.input_names
    assert "item_id" not in inputs and "hist_item_id" not in inputs
    assert {"sid_1", "sid_2", "hist_item_id_sid_1", "hist_item_id_sid_2"} <= set(inputs)
    assert fmap.sequences[0].fields[:2] == ["hist_item_id_sid_1", "hist_item_id_sid_2"]
    assert fmap.item_key is not None and fmap.item_key.name == "item_id"
    assert fmap.semantic_ids is not None and fmap.semantic_ids["levels"] == 2
    schema = StoreSchema.from_feature_map(fmap)
    assert schema.item_id_feature == "item_id" and "item_id" not in schema.item_sparse
    from ctrserve.feature_store.loader import read_prepared
    records = read_prepared(out)
    # every item of any split is keyed (the key's vocabulary spans the splits) and carries its codes
    assert len(records.items) == len(set(records.items.ids)) >= 140
    assert set(records.items.features) >= {"sid_1", "sid_2"}


def test_fit_users_build_the_codes_and_leave_the_training_split() -> None:
    spec = parse_spec({**SPEC, "semantic_ids": {**SPEC["semantic_ids"], "fit_users": 0.5}})
    raw = planted_splits()
    all_users = set(raw["train"]["user"].tolist())
    fit, raw = hold_out_fit_users(spec, raw, spec.semantic_ids)
    fit_users, kept_users = set(fit["user"].tolist()), set(raw["train"]["user"].tolist())
    assert fit_users and kept_users and not fit_users & kept_users and fit_users | kept_users == all_users
    assert len(fit["item"]) + len(raw["train"]["item"]) == 240
    # an item only the kept users touched has no behaviour in the fit rows: it is cold
    only_kept = set(raw["train"]["item"].tolist()) - set(fit["item"].tolist())
    table, report = assign_codes(spec, raw, spec.semantic_ids, fit)
    assert report.warm_items == len(set(fit["item"].tolist())) and set(table) >= only_kept
    again = hold_out_fit_users(spec, planted_splits(), spec.semantic_ids)[0]
    assert again["user"].tolist() == fit["user"].tolist()  # the same users for the same seed
    with pytest.raises(ValueError, match="no training rows"):
        hold_out_fit_users(spec, planted_splits(), spec.semantic_ids.model_copy(update={"fit_users": 1e-9}))
