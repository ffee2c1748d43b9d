"""``ctrserve ab``'s statistics on synthetic logs: exact AUC with ties and weights, GAUC, the
user-clustered CTR test, the AUC bootstrap's verdicts (a real difference is called, none is not)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctrserve.ab import Log, aa_check, compare_ctr, gauc, report, weighted_auc

pytestmark = pytest.mark.quick


def _log(n_users: int, strength: dict[str, float], seed: int = 0, rows_per_user: int = 4) -> Log:
    """Users split between arms; each arm's scores carry the label with its own ``strength``."""
    rng = np.random.default_rng(seed)
    arms = list(strength)
    user = np.repeat(np.arange(n_users), rows_per_user)
    arm = np.asarray([arms[u % len(arms)] for u in user], dtype=object)
    base = rng.normal(-1, 0.8, n_users)[user]  # users differ in how much they click
    clicked = rng.random(user.size) < 1 / (1 + np.exp(-(base + rng.normal(0, 1, user.size))))
    noise = rng.normal(0, 1, user.size)
    score = 1 / (1 + np.exp(-(np.asarray([strength[a] for a in arm]) * clicked + noise)))
    return Log(np.arange(user.size), user, arm, score, clicked, np.zeros(user.size, dtype=np.int64),
               [str(i) for i in range(user.size)], [f"u{u}" for u in range(n_users)], [None] * user.size, {})


def test_weighted_auc_equals_sklearn_with_ties_and_weights() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(2000), 2)  # many ties
    labels = rng.random(2000) < scores
    assert weighted_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    weights = rng.integers(0, 3, 2000).astype(float)
    assert weighted_auc(scores, labels, weights) == pytest.approx(roc_auc_score(labels, scores,
                                                                                sample_weight=weights))
    assert weighted_auc(scores, np.zeros(2000, dtype=bool)) is None


def test_gauc_weights_users_with_both_labels() -> None:
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5])
    labels = np.array([True, False, True, False, True])
    users = np.array([0, 0, 1, 1, 2])  # user 2 has one label only: left out
    assert gauc(scores, labels, users) == pytest.approx(0.5)  # user 0: 1, user 1: 0


def test_a_real_auc_difference_is_called_better_and_none_is_not() -> None:
    log = _log(3000, {"control": 0.5, "treatment": 1.5})
    rep = report(log, ["control", "treatment"], n_boot=100)
    assert rep["comparisons"]["treatment"]["auc"]["verdict"] == "better"
    assert report(log, ["treatment", "control"], n_boot=100)["comparisons"]["control"]["auc"]["verdict"] == "worse"
    same = _log(3000, {"a": 1.0, "b": 1.0}, seed=2)
    cmp_ = report(same, ["a", "b"], n_boot=100)["comparisons"]["b"]
    assert cmp_["auc"]["verdict"] == "not yet distinguishable"
    assert cmp_["ctr"]["verdict"] == "not yet distinguishable"
    assert sum(v == "not yet distinguishable" for v in aa_check(same, "a", salts=10, n_boot=100)) >= 8


def test_ctr_test_accounts_for_users_clicking_alike() -> None:
    """Clicks correlated within users: the clustered interval is wider than the binomial one."""
    log = _log(400, {"a": 1.0, "b": 1.0}, rows_per_user=20)
    stats = report(log, ["a", "b"], n_boot=20)["arms"]
    clustered = compare_ctr(log, stats["a"], stats["b"])
    p1, p2 = stats["a"]["ctr"], stats["b"]["ctr"]
    binomial = np.sqrt(p1 * (1 - p1) / stats["a"]["impressions"] + p2 * (1 - p2) / stats["b"]["impressions"])
    assert clustered["ci95"][1] - clustered["ci95"][0] > 1.3 * 2 * 1.96 * binomial


def test_with_request_prefix_keeps_one_replays_rows() -> None:
    """The demo's report reads only its replay's requests: rows of other requests (the sample
    requests, earlier demos on the same Redis) leave every figure."""
    log = _log(40, {"a": 1.0, "b": 1.0})
    log.request_ids = [("replay-" if r % 3 else "sample-") + str(r) for r in range(len(log.request_ids))]
    mine = log.with_request_prefix("replay-")
    keep = log.request % 3 != 0
    assert len(mine.score) == keep.sum() and 0 < keep.sum() < len(keep)
    assert all(mine.request_ids[r].startswith("replay-") for r in mine.request)
    assert np.array_equal(mine.clicked, log.clicked[keep]) and np.array_equal(mine.user, log.user[keep])
    expected = weighted_auc(log.score[keep & (log.arm == "a")], log.clicked[keep & (log.arm == "a")])
    assert report(mine, ["a", "b"])["arms"]["a"]["auc"] == pytest.approx(expected)
