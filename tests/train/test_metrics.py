"""AUC/GAUC/LogLoss against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrserve.models.train.metrics import auc, gauc, logloss

pytestmark = pytest.mark.quick


def test_gauc_hand_computed() -> None:
    # user a: 4 impressions, positives at 0.9 and 0.3, negatives at 0.5 and 0.1
    #   pairs (pos > neg): 0.9>0.5, 0.9>0.1, 0.3>0.1 -> 3 of 4 -> AUC 0.75
    # user b: 3 impressions, pos 0.2, negs 0.2 (tie counts 1/2) and 0.1 -> (0.5 + 1) / 2 = 0.75
    # user c: 2 impressions, both negative -> skipped
    # user d: 2 impressions, pos 0.1, neg 0.8 -> AUC 0
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0])
    scores = np.array([0.9, 0.5, 0.3, 0.1, 0.2, 0.2, 0.1, 0.4, 0.6, 0.1, 0.8])
    groups = np.array(["a", "a", "a", "a", "b", "b", "b", "c", "c", "d", "d"])
    expected = (4 * 0.75 + 3 * 0.75 + 2 * 0.0) / (4 + 3 + 2)
    assert gauc(labels, scores, groups) == pytest.approx(expected)


def test_gauc_equals_auc_for_one_user() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 2)  # ties included
    assert gauc(y, s, np.zeros(200, dtype=int)) == pytest.approx(auc(y, s))


def test_gauc_without_any_two_class_user_is_nan() -> None:
    assert math.isnan(gauc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 2])))


def test_logloss_is_clipped_and_hand_checked() -> None:
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    # certain and wrong: clipped to 1e-7 instead of log(0)
    assert logloss(np.array([1, 0]), np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
