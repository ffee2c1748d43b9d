"""The test AUC's standard error by bootstrap over users (models/train/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrserve.models.train.metrics import auc_se_by_users

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
