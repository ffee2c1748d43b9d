"""``ctrserve data rules``: no-model history rules on a prepared sequence dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ctrserve.contract.feature_map import OOV_ID, FeatureMap
from ctrserve.contract.prepared import load_split
from ctrserve.models.data.rules import candidate_oov, gap_to_best_rule, history_rules, rule_scores

pytestmark = pytest.mark.quick


def test_rules_score_history_matches(tiny_prepared: Path, tmp_path: Path) -> None:
    fmap = FeatureMap.load(tiny_prepared / "feature_map.json")
    seq = fmap.sequences[0]
    rows = history_rules(tiny_prepared)
    assert {r["split"] for r in rows} == {"valid", "test"}
    assert len(rows) == 2 * 2 * len(seq.fields)  # splits x (count, share) x field pairs
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)

    # a copy whose candidate ids are planted into the history of positives only: count separates perfectly
    copy = tmp_path / "planted"
    shutil.copytree(tiny_prepared, copy)
    for split in ("valid", "test"):
        data = load_split(copy, split)
        field, target = seq.fields[0], seq.targets[0]
        hist = data[field].copy()
        hist[data[target][:, None] == hist] = 0  # no accidental matches ...
        pos = data[fmap.label] == 1
        hist[pos, 0] = data[target][pos]  # ... except one for every positive
        data[field] = hist
        np.savez(copy / f"{split}.npz", **data)
    planted = {r["rule"]: r for r in history_rules(copy, ("test",))}
    rule = planted[f"count({seq.fields[0]} == {seq.targets[0]})"]
    assert rule["auc"] == pytest.approx(1.0)
    assert rule["pos_matched"] == 1.0 and rule["neg_matched"] == 0.0


def test_candidate_oov_shares_by_label(tiny_prepared: Path, tmp_path: Path) -> None:
    fmap = FeatureMap.load(tiny_prepared / "feature_map.json")
    target = fmap.sequences[0].targets[0]
    copy = tmp_path / "oov"
    shutil.copytree(tiny_prepared, copy)
    data = load_split(copy, "test")
    y = data[fmap.label]
    ids = data[target].copy()
    ids[y == 1] = OOV_ID  # every positive unknown, no negative
    ids[(y == 0) & (ids == OOV_ID)] = OOV_ID + 1
    data[target] = ids
    np.savez(copy / "test.npz", **data)
    row = next(r for r in candidate_oov(copy, ("test",)) if r["feature"] == target)
    assert row["positives"] == 1.0 and row["negatives"] == 0.0


def test_rules_need_a_sequence(tiny_prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "flat"
    shutil.copytree(tiny_prepared, copy)
    fmap = FeatureMap.load(copy / "feature_map.json")
    (copy / "feature_map.json").write_text(fmap.model_copy(update={"sequences": []}).model_dump_json())
    with pytest.raises(ValueError, match="no behaviour sequence"):
        history_rules(copy)


def test_rules_standard_error_by_users(tiny_prepared: Path) -> None:
    """With ``se_rounds`` every rule carries its AUC's bootstrap-over-users standard error
    (a few thousandths to hundredths on 600 test rows), absent without it."""
    plain = history_rules(tiny_prepared, ("test",))
    rows = history_rules(tiny_prepared, ("test",), se_rounds=30)
    assert all("auc_se" not in r for r in plain)
    assert [r["auc"] for r in rows] == [r["auc"] for r in plain]
    assert all(0.0 < float(r["auc_se"]) < 0.05 for r in rows), [r["auc_se"] for r in rows]


def test_gap_to_the_rule_chosen_on_valid_is_paired_over_users(tiny_prepared: Path) -> None:
    fmap = FeatureMap.load(tiny_prepared / "feature_map.json")
    test = load_split(tiny_prepared, "test")
    on_valid = {r["rule"]: r["auc"] for r in history_rules(tiny_prepared, ("valid",))}
    best = max(on_valid, key=on_valid.__getitem__)
    # the rule's own scores as the "model": no gap, and the rule picked is the one best on valid
    own = rule_scores(fmap, test)[best]
    g = gap_to_best_rule(tiny_prepared, own, rounds=50)
    assert g["rule"] == best and g["gap"] == 0.0 and g["se"] == 0.0
    # an oracle beats it by its whole shortfall, clearly
    oracle = test[fmap.label] + 0.0
    g = gap_to_best_rule(tiny_prepared, oracle, rounds=50)
    assert g["model_auc"] == 1.0 and g["gap"] == pytest.approx(1.0 - g["rule_auc"]) and g["ci_low"] > 0
    with pytest.raises(ValueError, match="predictions for"):
        gap_to_best_rule(tiny_prepared, oracle[:-1])
