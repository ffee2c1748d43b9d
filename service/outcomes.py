"""Outcomes per arm from the counters the loop keeps in Redis: CTR with its 95 % interval,
calibration (mean predicted vs observed CTR) and the online AUC from score histograms.

Every logged impression adds 1 to its score's bin ``h:<bin>``; its first click adds 1 to
``p:<bin>``. Bins are equal steps of the logit over [-8, 8] (1,000 bins, 0.016 logit wide: at a
score of 0.1 a bin is 0.0014 wide), so the AUC computed from them — positives above negatives,
ties within a bin counted half — stays within about 1e-3 of the exact AUC on the same scores
(tests/service/test_outcomes.py) while the histograms stay a fixed size whatever the traffic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BINS = 1000
LOGIT_RANGE = 8.0
Z95 = 1.959963984540054


def score_bins(scores: np.ndarray) -> np.ndarray:
    """Each score's histogram bin in [0, BINS)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    logit = np.clip(np.log(p) - np.log1p(-p), -LOGIT_RANGE, LOGIT_RANGE)
    return np.minimum(((logit + LOGIT_RANGE) * (BINS / (2 * LOGIT_RANGE))).astype(np.int64), BINS - 1)


def auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties half; None without both labels."""
    n_pos, n_neg = float(positives.sum()), float(negatives.sum())
    if n_pos <= 0 or n_neg <= 0:
        return None
    below = np.cumsum(negatives) - negatives  # negatives in lower bins
    return float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))


def histograms(row: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per bin from an outcome hash."""
    pos, total = np.zeros(BINS), np.zeros(BINS)
    for key, value in row.items():
        kind, _, b = key.partition(":")
        if kind in ("p", "h") and b.isdigit() and int(b) < BINS:
            (pos if kind == "p" else total)[int(b)] += value
    return pos, np.maximum(total - pos, 0)


def wilson(successes: float, n: float) -> tuple[float, float] | None:
    """95 % Wilson interval of a proportion (None for n = 0)."""
    if n <= 0:
        return None
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(row: dict[str, float]) -> dict[str, Any]:
    """One arm's outcomes as ``GET /v1/experiments/{name}`` answers them."""
    impressions, clicks = row.get("impressions", 0.0), row.get("clicks", 0.0)
    ctr = clicks / impressions if impressions else None
    mean_predicted = row.get("sum_predicted", 0.0) / impressions if impressions else None
    pos, neg = histograms(row)
    ci = wilson(clicks, impressions)
    return {
        "requests": int(row.get("requests", 0)), "impressions": int(impressions), "clicks": int(clicks),
        "ctr": ctr, "ctr_ci95": list(ci) if ci else None, "mean_predicted": mean_predicted,
        "calibration": mean_predicted / ctr if ctr else None, "auc": auc_from_histograms(pos, neg),
        "conversions": int(row.get("ev_conversion", 0)), "impression_events": int(row.get("ev_impression", 0)),
        "repeat_clicks": int(row.get("repeat_clicks", 0)),
    }
