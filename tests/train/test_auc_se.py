"""The test AUC's standard error by bootstrap over users (models/train/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrserve.models.train.metrics import auc_se_by_users, paired_auc_gap_by_users

pytestmark = pytest.mark.quick


def _rows(users: int, per_user: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users differ in how well the score ranks their rows: rows of one user are not independent."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), per_user)
    y = rng.integers(0, 2, user.size)
    score = y * rng.uniform(-1.0, 3.0, users)[user] + rng.normal(0, 1.0, user.size)
    return y, score, user


def test_se_shrinks_with_users_and_counts_users_not_rows() -> None:
    small, big = auc_se_by_users(*_rows(50, 10, 0)), auc_se_by_users(*_rows(800, 10, 0))
    assert 0.15 < big / small < 0.4  # 16x the users: about 1/4 the error
    # the same rows seen as 500 one-row users: resampling rows understates the user-level spread
    y, score, _ = _rows(50, 10, 0)
    by_row = auc_se_by_users(y, score, np.arange(y.size))
    assert by_row < 0.7 * small
    assert auc_se_by_users(*_rows(50, 10, 0)) == small, "deterministic for a seed"


def test_se_undefined_without_two_classes_or_users() -> None:
    assert math.isnan(auc_se_by_users(np.ones(10), np.arange(10.0), np.arange(10)))
    assert math.isnan(auc_se_by_users(np.array([0, 1]), np.array([0.1, 0.9]), np.zeros(2)))


def test_paired_gap_sees_a_small_real_difference_each_auc_se_hides() -> None:
    y, score, user = _rows(200, 10, 1)
    rng = np.random.default_rng(2)
    better = score + 0.15 * y + rng.normal(0, 0.05, y.size)  # the same ranking, slightly better
    g = paired_auc_gap_by_users(y, better, score, user, rounds=300)
    assert g["gap"] > 0 and g["ci_low"] > 0 and g["share_above"] > 0.975
    # each AUC alone moves far more from user draw to user draw than their paired gap does
    assert g["gap"] < 2 * auc_se_by_users(y, score, user)
    assert g["se"] < 0.5 * auc_se_by_users(y, score, user)


def test_paired_gap_of_a_score_with_itself_is_zero_and_swapping_flips_the_sign() -> None:
    y, score, user = _rows(100, 10, 3)
    same = paired_auc_gap_by_users(y, score, score, user, rounds=100)
    assert same["gap"] == 0.0 and same["se"] == 0.0
    rng = np.random.default_rng(4)
    other = score + rng.normal(0, 1.0, y.size)
    ab, ba = (paired_auc_gap_by_users(y, a, b, user, rounds=100) for a, b in ((score, other), (other, score)))
    assert ab["gap"] == pytest.approx(-ba["gap"]) and ab["se"] == pytest.approx(ba["se"])
