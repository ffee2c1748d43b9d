"""``prepare`` on the synthetic generator: feature map, splits, encodings, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctrserve.contract.feature_map import PAD_ID, FeatureMap
from ctrserve.contract.prepared import USER_KEY, load_split
from ctrserve.models.data.prepare import prepare

pytestmark = pytest.mark.quick


def test_feature_map_describes_every_input(tiny_prepared, tiny_fmap) -> None:
    names = tiny_fmap.input_names
    assert {"user_id", "item_id", "age", "hist_item_id", "hist_cate_id"} <= set(names)
    assert tiny_fmap.feature("hist_item_id").embedding == "item_id"
    assert tiny_fmap.feature("hist_cate_id").vocab_size == tiny_fmap.feature("cate_id").vocab_size
    assert tiny_fmap.sequences[0].fields[0] == "hist_item_id"
    assert sorted(tiny_fmap.density_order()) == sorted(names)
    assert tiny_fmap.density_order()[0] in {"age", "price", "quality"}  # dense features first
    for split in ("train", "valid", "test"):
        arrays = load_split(tiny_prepared, split)
        assert len(arrays["label"]) == tiny_fmap.num_rows[split]
        for f in tiny_fmap.features:
            assert arrays[f.name].dtype == np.dtype(f.dtype)
            if f.vocab_size:
                assert arrays[f.name].max() < f.vocab_size
        assert USER_KEY in arrays


def test_sequences_pad_at_the_end_and_dense_is_standardised(tiny_prepared) -> None:
    train = load_split(tiny_prepared, "train")
    seq = train["hist_item_id"]
    present = seq != PAD_ID
    # once padding starts it never stops: events are most-recent-first, padding last
    assert not (present[:, 1:] & ~present[:, :-1]).any()
    assert abs(float(train["age"].mean())) < 0.1 and abs(float(train["age"].std()) - 1) < 0.1


def test_prepare_is_deterministic(tmp_path) -> None:
    opts = {"n_rows": 500, "n_users": 50, "n_items": 40, "n_cates": 5, "max_len": 6}
    a = prepare("synthetic", tmp_path, tmp_path / "a", opts)
    b = prepare("synthetic", tmp_path, tmp_path / "b", opts)
    assert a.feature_map == b.feature_map
    for split in ("train", "test"):
        xa, xb = load_split(a.out_dir, split), load_split(b.out_dir, split)
        assert all(np.array_equal(xa[k], xb[k]) for k in xa)
    vocab = json.loads((a.out_dir / "vocab.json").read_text())
    assert set(vocab) == {f.embedding for f in a.feature_map.features if f.embedding}
    assert FeatureMap.load(a.out_dir / "feature_map.json") == a.feature_map


def test_missing_prepared_split_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run `ctrserve data prepare` first"):
        load_split(tmp_path, "train")


def test_max_len_override_resizes_sequences(tmp_path) -> None:
    out = prepare("synthetic", tmp_path, tmp_path / "p", {"n_rows": 300, "n_users": 30, "max_len": 9})
    assert out.feature_map.feature("hist_item_id").max_len == 9
    assert load_split(out.out_dir, "train")["hist_item_id"].shape[1] == 9


def test_prepare_publishes_whole_copies_and_survives_a_concurrent_prepare(tmp_path) -> None:
    """Two jobs preparing the same dataset at once both succeed (they used to race on mkdir), a
    re-prepare replaces the old copy, and no temporary directory is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    opts = {"n_rows": 300, "n_users": 30, "n_items": 20, "n_cates": 4, "max_len": 5}
    out = tmp_path / "processed" / "synthetic"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: prepare("synthetic", tmp_path, out, opts), range(2)))
    assert results[0].feature_map == results[1].feature_map
    (out / "stale.txt").write_text("from an older copy")
    prepare("synthetic", tmp_path, out, opts)
    assert sorted(p.name for p in out.parent.iterdir()) == ["synthetic"]
    assert not (out / "stale.txt").exists()
    assert FeatureMap.load(out / "feature_map.json") == results[0].feature_map
    assert len(load_split(out, "train")["label"]) == results[0].feature_map.num_rows["train"]
