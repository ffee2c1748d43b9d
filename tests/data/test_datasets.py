"""Dataset loaders: construction invariants on hand-written files (quick) and each loader on the
shared data (``data``; skipped without ../shared/data), on small slices to keep this file fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ctrserve.contract.prepared import load_split
from ctrserve.models.data.datasets import load_raw
from ctrserve.models.data.datasets.amazon import history_index, sample_untouched
from ctrserve.models.data.prepare import apply_overrides, prepare
from ctrserve.models.data.spec import SPEC_DIR, load_spec

SPLITS = ("train", "valid", "test")

# A tiny category in the Amazon format. User "u4" has one item only (no sample), item 9 has no
# attributes, item 8 a single one (brand only), and u1's history is longer than max_len=3.
TOY_SEQS = {
    "u1": [1, 2, 3, 4, 5, 6],
    "u2": [3, 1, 7],
    "u3": [8, 9],
    "u4": [5],
    "u5": [2, 4, 6, 8],
}
TOY_ATTRS = {"1": [10, 2, 30], "2": [11, 2, 31], "3": [10, 2, 32, 33], "4": [12, 2, 31],
             "5": [11, 2, 30], "6": [13, 2, 34], "7": [10, 2, 35], "8": [14]}
TOY_ITEMS = sorted({i for s in TOY_SEQS.values() for i in s})


def write_toy_category(root: Path, category: str = "Toy_Things") -> Path:
    folder = root / "amazon_toy"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join([u, *map(str, items)]) for u, items in TOY_SEQS.items()]
    (folder / f"{category}.txt").write_text("\n".join(lines) + "\n")
    (folder / f"{category}_item2attributes.json").write_text(json.dumps(TOY_ATTRS))
    return folder


def toy_spec(tmp_path: Path, max_len: int = 3) -> Path:
    spec = yaml.safe_load((SPEC_DIR / "amazon_sports.yaml").read_text())
    spec["name"] = "amazon_toy"
    spec["source"] = {"path": "amazon_toy", "category": "Toy_Things", "seed": 7}
    spec["features"][-1]["max_len"] = max_len
    path = tmp_path / "amazon_toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(split: dict[str, np.ndarray]) -> int:
    return len(split["label"])


def check_sequences(seq: np.ndarray) -> None:
    """Padding (-1) only at the end of each row: once an event is missing, all later ones are."""
    present = seq != -1
    assert (present[:, 1:] <= present[:, :-1]).all(), "padding must come after the events"


# ---------------------------------------------------------------- quick: hand-written data


@pytest.mark.quick
def test_history_index_is_most_recent_first_within_user() -> None:
    # flat events of two users: [0, 1, 2] and [3, 4]
    idx = history_index(np.array([2, 4, 3]), np.array([0, 3, 3]), 3)
    assert idx.tolist() == [[1, 0, -1], [3, -1, -1], [-1, -1, -1]]


@pytest.mark.quick
def test_sample_untouched_avoids_touched_items_and_is_seeded() -> None:
    n_items = 5
    touched = np.unique(np.array([0 * n_items + 0, 0 * n_items + 1, 0 * n_items + 2, 1 * n_items + 4]))
    users = np.array([0] * 200 + [1] * 200)
    a = sample_untouched(users, n_items, touched, np.random.default_rng(3))
    b = sample_untouched(users, n_items, touched, np.random.default_rng(3))
    assert (a == b).all()
    assert set(a[:200].tolist()) == {3, 4}
    assert set(a[200:].tolist()) == {0, 1, 2, 3}


@pytest.mark.quick
def test_sample_untouched_refuses_a_user_who_touched_everything() -> None:
    touched = np.arange(3)  # user 0 touched items 0, 1, 2 of 3
    with pytest.raises(ValueError, match="every item"):
        sample_untouched(np.array([0]), 3, touched, np.random.default_rng(0))


@pytest.fixture()
def toy(tmp_path: Path) -> tuple[Path, Path]:
    write_toy_category(tmp_path)
    return tmp_path, toy_spec(tmp_path)


def load_toy(data_dir: Path, spec_path: Path, **source) -> dict:
    spec = apply_overrides(load_spec(spec_path), source or None)
    return load_raw(spec.loader, data_dir, spec, **spec.source)


@pytest.mark.quick
def test_amazon_construction_invariants(toy: tuple[Path, Path]) -> None:
    data_dir, spec_path = toy
    raw = load_toy(data_dir, spec_path)
    n_pos = sum(len(s) - 1 for s in TOY_SEQS.values())
    assert sum(rows(raw[s]) for s in SPLITS) == 2 * n_pos
    for split in SPLITS:
        part = raw[split]
        assert part["hist_item_id"].shape == (rows(part), 3)
        assert part["label"].mean() == 0.5
        check_sequences(part["hist_item_id"])
        pos, neg = part["label"] == 1, part["label"] == 0
        # a negative shares its positive's user and history
        assert (part["user_id"][pos] == part["user_id"][neg]).all()
        assert (part["hist_item_id"][pos] == part["hist_item_id"][neg]).all()
        for i in range(rows(part)):
            seq = TOY_SEQS[str(part["user_id"][i])]
            item = int(part["item_id"][i])
            hist = [h for h in part["hist_item_id"][i].tolist() if h != -1]
            assert hist, "the history has at least one item"
            if part["label"][i] == 1:
                t = seq.index(item) if seq.count(item) == 1 else None
                assert t is not None and t >= 1
                # the history is exactly the items before the target, most recent first, capped
                assert hist == seq[:t][::-1][:3]
                # split by time: last interaction test, the one before valid
                expected = "test" if t == len(seq) - 1 else "valid" if t == len(seq) - 2 else "train"
                assert split == expected
            else:
                assert item not in seq, "a negative is an item the user never touched"
                assert item in TOY_ITEMS
    # users with a single interaction give no sample; every other user has one test positive
    test_users = raw["test"]["user_id"][raw["test"]["label"] == 1].tolist()
    assert sorted(test_users) == ["u1", "u2", "u3", "u5"]


@pytest.mark.quick
def test_amazon_attributes_brand_first_category_last(toy: tuple[Path, Path]) -> None:
    data_dir, spec_path = toy
    raw = load_toy(data_dir, spec_path)
    for split in SPLITS:
        part = raw[split]
        for item, brand, cate in zip(part["item_id"], part["brand"], part["cate"], strict=True):
            attrs = TOY_ATTRS.get(str(item), [])
            assert brand == (attrs[0] if attrs else -1)
            assert cate == (attrs[-1] if len(attrs) >= 2 else -1)
        # history attributes follow the history items (shared embeddings need the same mapping)
        hist = part["hist_item_id"]
        for (r, c) in zip(*np.nonzero(hist != -1), strict=True):
            attrs = TOY_ATTRS.get(str(hist[r, c]), [])
            assert part["hist_brand"][r, c] == (attrs[0] if attrs else -1)
            assert part["hist_cate"][r, c] == (attrs[-1] if len(attrs) >= 2 else -1)
        assert (part["hist_brand"][hist == -1] == -1).all()


@pytest.mark.quick
def test_amazon_is_deterministic_and_seeded(toy: tuple[Path, Path]) -> None:
    data_dir, spec_path = toy
    a = load_toy(data_dir, spec_path)
    b = load_toy(data_dir, spec_path)
    for split in SPLITS:
        for key in a[split]:
            assert (a[split][key] == b[split][key]).all()
    negs = {seed: np.concatenate([load_toy(data_dir, spec_path, seed=seed)[s]["item_id"] for s in SPLITS])
            for seed in range(5)}
    assert len({tuple(v.tolist()) for v in negs.values()}) > 1, "the seed must drive the negatives"


@pytest.mark.quick
def test_amazon_any_category_prepares_end_to_end(toy: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, spec_path = toy
    prepared = prepare(spec_path, data_dir, tmp_path / "out")
    fmap = prepared.feature_map
    assert fmap.num_rows["test"] == 8 and fmap.user_id == "user_id"
    assert "user_id" not in [f.name for f in fmap.features], "the user id groups GAUC, it is not a feature"
    test = load_split(tmp_path / "out", "test")
    assert test["hist_item_id"].shape == (8, 3)
    assert (test["hist_item_id"][:, 0] != 0).all(), "every test history has an event (PAD = 0)"


@pytest.mark.quick
def test_amazon_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    folder = write_toy_category(tmp_path)
    spec_path = toy_spec(tmp_path)
    with pytest.raises(FileNotFoundError, match="Other_Cat.txt"):
        load_toy(tmp_path, spec_path, category="Other_Cat")
    (folder / "Toy_Things.txt").write_text("u1 1 2 x3\n")
    with pytest.raises(ValueError, match="integers"):
        load_toy(tmp_path, spec_path)
    (folder / "Toy_Things.txt").write_text("u1 1 2 3\n")
    (folder / "Toy_Things_item2attributes.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_toy(tmp_path, spec_path)


# ---------------------------------------------------------------- data: the shared datasets


@pytest.mark.data
def test_amazon_sports_slice(shared_data: Path, tmp_path: Path) -> None:
    spec = apply_overrides(load_spec("amazon_sports"), {"max_users": 1500})
    raw = load_raw(spec.loader, shared_data, spec, **spec.source)
    # one test and one valid positive (+ negative) per user
    assert rows(raw["test"]) == rows(raw["valid"]) == 2 * 1500
    assert rows(raw["train"]) > 4 * rows(raw["test"])
    users = {s: set(raw[s]["user_id"].tolist()) for s in SPLITS}
    assert users["test"] == users["valid"] and len(users["test"]) == 1500
    for split in SPLITS:
        part = raw[split]
        assert part["label"].mean() == 0.5
        assert part["hist_item_id"].shape == (rows(part), 50)
        check_sequences(part["hist_item_id"])
        assert (part["hist_item_id"][:, 0] != -1).all()
        assert (part["brand"] != -1).all(), "every Sports item has a brand token"
    # valid history = test history shifted by one (the valid target is the test history's head)
    pos_v = raw["valid"]["label"] == 1
    pos_t = raw["test"]["label"] == 1
    assert (raw["test"]["hist_item_id"][pos_t][:, 0] == raw["valid"]["item_id"][pos_v]).all()
    assert (raw["test"]["hist_item_id"][pos_t][:, 1:] == raw["valid"]["hist_item_id"][pos_v][:, :-1]).all()
    out = prepare("amazon_sports", shared_data, tmp_path / "amz", {"max_users": 300})
    assert out.feature_map.num_rows["test"] == 600


@pytest.mark.data
def test_criteo_sample(shared_data: Path, tmp_path: Path) -> None:
    spec = load_spec("criteo_sample")
    raw = load_raw(spec.loader, shared_data, spec, **spec.source)
    assert [rows(raw[s]) for s in SPLITS] == [7200, 409, 391]
    train = raw["train"]
    assert set(np.unique(train["label"]).tolist()) == {0.0, 1.0}
    assert 0.1 < train["label"].mean() < 0.5
    assert train["I1"].dtype == np.float32 and np.isnan(train["I1"]).any(), "empty counts are NaN"
    assert (train["C22"] == "").any(), "empty categories stay empty (missing)"
    out = prepare("criteo_sample", shared_data, tmp_path / "criteo", {"max_rows": 500})
    assert out.feature_map.num_rows == {"train": 500, "valid": 409, "test": 391}
    assert len(out.feature_map.dense) == 13


@pytest.mark.data
def test_avazu_sample(shared_data: Path, tmp_path: Path) -> None:
    spec = load_spec("avazu_sample")
    raw = load_raw(spec.loader, shared_data, spec, **spec.source)
    assert [len(raw[s]["click"]) for s in SPLITS] == [8087, 480, 432]
    for split in SPLITS:
        part = raw[split]
        assert "id" not in part and "hour" not in part
        # the sample is 2014-10-21 00h, a Tuesday: the header-less files parse the same way
        assert (part["hour_of_day"] == 0).all() and (part["weekday"] == 1).all()
        assert set(np.unique(part["click"]).tolist()) <= {0.0, 1.0}
    out = prepare("avazu_sample", shared_data, tmp_path / "avazu", {"max_rows": 500})
    assert out.feature_map.user_id == "device_ip"
    assert {f.side for f in out.feature_map.features} == {"user", "item", "context"}
