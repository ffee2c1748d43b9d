"""The outcome math of the closed loop: AUC from score histograms against the exact AUC, the
Wilson interval, one arm's summary from its Redis counters."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctrserve.service.outcomes import BINS, auc_from_histograms, histograms, score_bins, summarize, wilson

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_is_within_1e3_of_the_exact_auc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(-2.5, 1.2, 50_000)  # CTR-like scores, mostly below 0.2
    scores = 1 / (1 + np.exp(-logits))
    labels = rng.random(scores.size) < 1 / (1 + np.exp(-(logits * 0.8 + rng.normal(0, 1, scores.size))))
    bins = score_bins(scores)
    assert bins.min() >= 0 and bins.max() < BINS
    pos = np.bincount(bins[labels], minlength=BINS).astype(float)
    neg = np.bincount(bins[~labels], minlength=BINS).astype(float)
    exact = roc_auc_score(labels, scores)
    assert abs(auc_from_histograms(pos, neg) - exact) < 1e-3, (auc_from_histograms(pos, neg), exact)


def test_auc_needs_both_labels_and_ranks_correctly() -> None:
    assert auc_from_histograms(np.zeros(BINS), np.ones(BINS)) is None
    pos, neg = np.zeros(BINS), np.zeros(BINS)
    pos[900], neg[100] = 5, 5
    assert auc_from_histograms(pos, neg) == 1.0
    assert auc_from_histograms(neg, pos) == 0.0
    assert auc_from_histograms(pos, pos) == 0.5  # one bin: ties count half


def test_wilson_interval_contains_the_proportion() -> None:
    assert wilson(0, 0) is None
    lo, hi = wilson(50, 1000)
    assert lo < 0.05 < hi and lo > 0.035 and hi < 0.068
    assert wilson(0, 10)[0] == 0.0


def test_summary_from_an_outcome_hash() -> None:
    row = {"requests": 2.0, "impressions": 10.0, "clicks": 2.0, "sum_predicted": 1.5, "h:400": 6.0, "h:600": 4.0,
           "p:600": 2.0, "ev_conversion": 1.0, "junk": 3.0}
    s = summarize(row)
    assert s["ctr"] == pytest.approx(0.2) and s["mean_predicted"] == pytest.approx(0.15)
    assert s["calibration"] == pytest.approx(0.75) and s["conversions"] == 1
    assert s["auc"] == pytest.approx(7 / 8)  # clicks beat the 6 lower negatives, tie with the 2 in their bin
    pos, neg = histograms(row)
    assert pos.sum() == 2 and neg.sum() == 8
    empty = summarize({})
    assert empty["ctr"] is None and empty["auc"] is None and empty["impressions"] == 0
