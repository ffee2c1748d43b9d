"""frappe_meta: the metadata join on the shared data (``data``) and on a hand-written table (quick)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctrserve.models.data.datasets import load_raw
from ctrserve.models.data.datasets.frappe_meta import _aggregates, join_meta, read_meta
from ctrserve.models.data.spec import load_spec

META = """item\tpackage\tcategory\tdownloads\tdeveloper\ticon\tlanguage\tdescription\tname\tprice\trating\tshort desc
0\ta\tTools\t1 - 5\tdevA\t-\ten\t-\tA\tFree\t4.5\t-
1\tb\tunknown\tunknown\tunknown\t-\tunknown\t-\tB\tunknown\tunknown\t-
2\tc\tGames\t5 - 10\tdevA\t-\tde\t-\tC\t$2.99\t3.9\t-
"""


def toy_meta(tmp_path: Path) -> pd.DataFrame:
    path = tmp_path / "meta.csv"
    path.write_text(META)
    return read_meta(path)


@pytest.mark.quick
def test_unknown_metadata_is_missing_and_prices_are_dollars(tmp_path: Path) -> None:
    meta = toy_meta(tmp_path)
    assert meta.loc[1, "category"] == "" and np.isnan(meta.loc[1, "rating"]) and np.isnan(meta.loc[1, "price_usd"])
    assert meta.loc[0, "price_usd"] == 0.0 and meta.loc[2, "price_usd"] == pytest.approx(2.99)
    assert meta.loc[2, "rating"] == pytest.approx(3.9)


@pytest.mark.quick
def test_aggregates_are_one_value_per_item_and_user_from_train_positives(tmp_path: Path) -> None:
    meta = toy_meta(tmp_path)
    train = {"user": np.array([7, 7, 7, 8, 8]), "item": np.array([0, 2, 1, 0, 2]),
             "label": np.array([1, 1, 0, 1, 0], dtype=np.float32)}
    item_pop, users = _aggregates(train, meta)
    test = {"user": np.array([7, 8, 9]), "item": np.array([0, 2, 5]), "label": np.zeros(3, np.float32)}
    out = join_meta(test, meta, item_pop, users)
    # item 0: two train positives; item 2: one; item 5: unseen and without metadata
    assert out["item_pop"].tolist() == [2.0, 1.0, 0.0]
    # user 7: two positives in two categories; user 8: one positive in one; user 9: unseen
    assert out["user_positives"].tolist() == [2.0, 1.0, 0.0]
    assert out["user_categories"].tolist() == [2.0, 1.0, 0.0]
    assert out["category"].tolist() == ["Tools", "Games", ""]
    assert np.isnan(out["rating"][2])


@pytest.mark.data
def test_shared_frappe_meta_joins_the_raw_log_on_the_item(shared_data: Path) -> None:
    spec = load_spec("frappe_meta")
    raw = load_raw(spec.loader, shared_data, spec, **spec.source)
    train = raw["train"]
    # the libsvm item index is the raw log's item id: every train positive is a pair of the log
    log = pd.read_csv(shared_data / "frappe" / "raw" / "frappe.csv", sep="\t", usecols=["user", "item"])
    pairs = set(zip(log["user"], log["item"], strict=True))
    pos = train["label"] == 1
    assert all(p in pairs for p in zip(train["user"][pos], train["item"][pos], strict=True))
    assert len(spec.features) >= 15
    assert set(f.name for f in spec.features) <= set(train)
    # 550 of 4,082 apps have no metadata; the rows that show them read as missing, not "unknown"
    assert not np.any(train["category"] == "unknown")
    share_missing = float(np.mean(train["category"] == ""))
    assert 0.0 < share_missing < 0.3
    assert {len(raw[s]["label"]) for s in raw} == {202027, 57722, 28860}
