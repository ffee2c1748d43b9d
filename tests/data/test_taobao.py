"""Taobao UserBehavior construction (models/data/datasets/taobao.py): invariants on a hand-written
event file (quick) and the split statistics on the real head file (``data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.feature_map import OOV_ID
from ctrserve.contract.prepared import load_split
from ctrserve.models.data.datasets import VOCAB_KEY, load_raw
from ctrserve.models.data.datasets.taobao import local_day_start
from ctrserve.models.data.prepare import apply_overrides, prepare
from ctrserve.models.data.rules import candidate_oov, history_rules
from ctrserve.models.data.spec import load_spec

SPLITS = ("train", "valid", "test")
DAYS = {"warmup_end": "2017-11-30", "valid_start": "2017-12-02", "test_start": "2017-12-03"}


def write_events(root: Path) -> Path:
    """Three users (1-3), one event an hour each from 11-28 to 12-03 Beijing time, every event a new
    item: at hour h user u views item ``1000 + k`` with ``k = 3h + u`` (category ``h % 5``), so an
    item's first (only) event is at time ``t0 + 3600 h + u``, increasing with k."""
    t0 = local_day_start("2017-11-28")
    lines = [f"{u},{1000 + 3 * h + u},{h % 5},pv,{t0 + 3600 * h + u}" for h in range(6 * 24) for u in (1, 2, 3)]
    folder = root / "taobao_userbehavior"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "UserBehavior_head.csv").write_text("\n".join(lines) + "\n")
    return root


def taobao(data_dir: Path, **over) -> dict:
    spec = apply_overrides(load_spec("taobao"), over)
    return load_raw(spec.loader, data_dir, spec, **spec.source)


WARM_K = 3 * 47 + 3  # items 1000 + k with k <= WARM_K are the warm-up's (hours 0-47: 11-28 and 11-29)


@pytest.mark.quick
@pytest.mark.parametrize("negatives", ["popularity", "category", "uniform"])
def test_global_time_split_and_causal_negatives(tmp_path: Path, negatives: str) -> None:
    raw = taobao(write_events(tmp_path), max_len=20, negatives=negatives)
    ks = {}
    for split in SPLITS:
        part = raw[split]
        assert (part["label"][0::2] == 1).all() and (part["label"][1::2] == 0).all()
        pos_k, neg_k = part["item_id"][0::2] - 1000, part["item_id"][1::2] - 1000
        ks[split] = pos_k
        # a negative existed before its target (nothing from the future) and is not the user's own
        # item up to then (here every item is one user's: item k belongs to user k mod 3)
        assert (neg_k < pos_k).all()
        assert (neg_k % 3 != pos_k % 3).all()
        assert (part["hist_item_id"][0::2, 0] == part["item_id"][0::2] - 3).all(), "history: the hour before"
    # one global cutoff: every train target precedes every valid one, which precede every test one
    assert ks["train"].max() < ks["valid"].min() and ks["valid"].max() < ks["test"].min()
    assert [len(raw[s]["label"]) // 2 for s in SPLITS] == [2 * 24 * 3, 24 * 3, 24 * 3]
    # the vocabulary is the warm-up's ids, for candidates and histories alike
    assert set((raw[VOCAB_KEY]["item_id"] - 1000).tolist()) == set(range(1, WARM_K + 1))


@pytest.mark.quick
def test_popularity_negatives_share_the_positive_bucket(tmp_path: Path) -> None:
    """Every target here is a first view (bucket 0: unseen in the warm-up), so once other users'
    post-warm-up items exist, a negative is one of those, never a warm-up item."""
    matched = taobao(write_events(tmp_path), max_len=20)
    uniform = taobao(write_events(tmp_path), max_len=20, negatives="uniform")
    for raw, warm_share in ((matched, 0.0), (uniform, 0.1)):
        neg_k = np.concatenate([raw[s]["item_id"][1::2] - 1000 for s in ("valid", "test")])
        share = float((neg_k <= WARM_K).mean())
        assert share == 0.0 if warm_share == 0.0 else share > warm_share


@pytest.mark.quick
def test_same_seed_same_rows(tmp_path: Path) -> None:
    data = write_events(tmp_path)
    a, b, c = taobao(data, max_len=20), taobao(data, max_len=20), taobao(data, max_len=20, seed=7)
    assert all((a[s]["item_id"] == b[s]["item_id"]).all() for s in SPLITS)
    assert any((a[s]["item_id"] != c[s]["item_id"]).any() for s in SPLITS)


@pytest.mark.quick
def test_bad_options_are_named(tmp_path: Path) -> None:
    data = write_events(tmp_path)
    with pytest.raises(ValueError, match="negatives"):
        taobao(data, negatives="hardest")
    with pytest.raises(ValueError, match="warmup_end < valid_start < test_start"):
        taobao(data, valid_start="2017-11-29")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        taobao(data, test_start="December")


# ---------------------------------------------------------------- data: the real head file

# Stated tolerances: the largest train/valid/test spread each statistic may show (absolute).
HISTORY_SHARE_TOL = 0.05  # share of positives whose item / category is in their own history
OOV_SPLIT_TOL = 0.07  # OOV rate of candidates across splits (the warm-up vocabulary ages)
OOV_LABEL_TOL = 0.01  # OOV rate of positives against negatives within a split
RULE_AUC_TOL = 0.025  # AUC of each no-model rule (the item rule drifts most: the vocabulary ages)


@pytest.fixture(scope="module")
def head_prepared(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("taobao") / "prepared"
    prepare("taobao", shared_data, out, {"max_len": 50})
    return out


@pytest.mark.data
def test_split_statistics_agree(head_prepared: Path) -> None:
    rules = history_rules(head_prepared, SPLITS)
    for rule in {r["rule"] for r in rules}:
        by_split = [r for r in rules if r["rule"] == rule]
        for stat, tol in (("pos_matched", HISTORY_SHARE_TOL), ("auc", RULE_AUC_TOL)):
            values = [float(r[stat]) for r in by_split]
            assert max(values) - min(values) <= tol, (rule, stat, values)
    for feature in ("item_id", "cate_id"):
        rows = [r for r in candidate_oov(head_prepared) if r["feature"] == feature]
        for r in rows:
            assert abs(float(r["positives"]) - float(r["negatives"])) <= OOV_LABEL_TOL, r
        values = [float(r["positives"]) for r in rows]
        assert max(values) - min(values) <= OOV_SPLIT_TOL, (feature, values)
    # the statistics are not vacuous: cold items are common, and the category rule ranks well
    item_oov = [float(r["positives"]) for r in candidate_oov(head_prepared) if r["feature"] == "item_id"]
    assert min(item_oov) > 0.5
    best = max(float(r["auc"]) for r in rules if r["split"] == "test")
    assert best > 0.75


@pytest.mark.data
def test_uniform_negatives_leak_the_label_through_oov(shared_data: Path) -> None:
    """The check above can fail: negatives drawn from every existing item (not matched on the
    warm-up bucket) are out of vocabulary far less often than positives."""
    raw = taobao(shared_data, max_len=5, negatives="uniform")
    vocab = np.unique(raw[VOCAB_KEY]["item_id"])
    test = raw["test"]
    oov = ~np.isin(test["item_id"], vocab)
    pos = test["label"] == 1
    assert oov[pos].mean() - oov[~pos].mean() > 10 * OOV_LABEL_TOL


@pytest.mark.data
def test_every_user_and_no_future(shared_data: Path, head_prepared: Path) -> None:
    raw = taobao(shared_data, max_len=5)
    users = set().union(*(set(raw[s]["user_id"].tolist()) for s in SPLITS))
    assert len(users) >= 790, "every user with an event after the warm-up and 5 earlier ones"
    counts = {s: len(raw[s]["label"]) for s in SPLITS}
    assert counts["test"] > 20_000
    data = load_split(head_prepared, "test")
    assert (data["item_id"] == OOV_ID).any() and (data["item_id"] > OOV_ID).any()


@pytest.mark.data
def test_honours_any_max_len(shared_data: Path, tmp_path: Path) -> None:
    long, short = taobao(shared_data, max_len=600, max_users=40), taobao(shared_data, max_len=7, max_users=40)
    for split in SPLITS:
        assert short[split]["hist_item_id"].shape[1] == 7
        assert (short[split]["hist_item_id"] == long[split]["hist_item_id"][:, :7]).all()
    out = prepare("taobao", shared_data, tmp_path / "tb", {"max_users": 20, "max_len": 30})
    assert out.feature_map.sequences[0].max_len == 30
