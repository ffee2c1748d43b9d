"""amazon_sports_wide: the wide columns on a hand-written category (quick) and the shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from test_datasets import TOY_ATTRS, load_toy, write_toy_category

from ctrserve.models.data.datasets.amazon_wide import distinct, row_mode
from ctrserve.models.data.spec import SPEC_DIR

SPLITS = ("train", "valid", "test")


@pytest.mark.quick
def test_row_mode_and_distinct_ignore_padding() -> None:
    x = np.array([[3, 5, 3, -1], [-1, -1, -1, -1], [7, 2, 2, 7], [9, -1, -1, -1]])
    mode, count = row_mode(x)
    assert mode.tolist() == [3, -1, 2, 9] and count.tolist() == [2, 0, 2, 1]  # tie 2/7: the smaller
    assert distinct(x).tolist() == [2, 0, 2, 1]


def wide_toy_spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load((SPEC_DIR / "amazon_sports_wide.yaml").read_text())
    spec["name"] = "amazon_toy_wide"
    spec["source"] = {"path": "amazon_toy", "category": "Toy_Things", "seed": 7}
    next(f for f in spec["features"] if f["type"] == "sequence")["max_len"] = 3
    path = tmp_path / "amazon_toy_wide.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.quick
def test_wide_rows_are_the_amazon_rows_plus_columns_from_the_past(tmp_path: Path) -> None:
    from test_datasets import toy_spec

    write_toy_category(tmp_path)
    narrow = load_toy(tmp_path, toy_spec(tmp_path))
    wide = load_toy(tmp_path, wide_toy_spec(tmp_path))
    for split in SPLITS:
        for col in narrow[split]:
            np.testing.assert_array_equal(wide[split][col], narrow[split][col], err_msg=f"{split}/{col}")
    train = wide["train"]
    hist = train["hist_item_id"]
    # the user aggregates describe the row's own (earlier) history
    assert train["hist_len"].tolist() == (hist >= 0).sum(axis=1).tolist()
    for r in range(len(hist)):
        cates = [TOY_ATTRS[str(i)][-1] for i in hist[r] if i >= 0 and len(TOY_ATTRS.get(str(i), [])) >= 2]
        assert train["hist_cates"][r] == len(set(cates))
    # popularity counts training positives per item, the same for every row of an item
    pos = train["label"] == 1
    for item in np.unique(train["item_id"]):
        want = float(np.sum(pos & (train["item_id"] == item)))
        assert set(train["item_pop"][train["item_id"] == item].tolist()) == {want}
    # the second path level is the attribute after the category's root ("2"); item 8 has none
    item_l2 = {str(i): v for i, v in zip(train["item_id"], train["cate_l2"], strict=True)}
    for item, l2 in item_l2.items():
        attrs = TOY_ATTRS.get(item, [])
        assert l2 == (attrs[2] if len(attrs) >= 3 else -1)


@pytest.mark.data
def test_shared_amazon_sports_wide_has_at_least_15_tokens(shared_data: Path) -> None:
    from ctrserve.models.data.spec import load_spec

    spec = load_spec("amazon_sports_wide")
    tokens = sum(len(f.fields) if f.type == "sequence" else 1 for f in spec.features)
    assert tokens >= 15
    raw = load_toy(shared_data, SPEC_DIR / "amazon_sports_wide.yaml", max_users=400)
    train = raw["train"]
    assert 0.0 < float(np.mean(train["cate_l2"] >= 0)) <= 1.0
    share = train["hist_brand_loyalty"][train["hist_len"] > 0]
    assert np.all((share > 0) & (share <= 1))
