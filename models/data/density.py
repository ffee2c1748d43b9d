"""Information-density statistics of a feature on the training split.

MGDIN orders features by information density so that consecutive features (and so the
groups its windows form) carry similar information. The paper gives no formula; we measure
cardinality, Shannon entropy, coverage and OOV rate, and summarise them as

    density = log2(1 + n_present / 2**H)

the (log) number of training rows behind each *effective* value (2**H is the perplexity of
the value distribution). A dense numeric feature (one shared vector) has H = 0 and the
highest density; a long-tail id has many effective values and few rows per value.
"""

from __future__ import annotations

import math

import numpy as np

from ctrserve.contract.feature_map import OOV_ID, PAD_ID, DensityStats


def entropy_bits(ids: np.ndarray) -> float:
    """Shannon entropy (bits) of the empirical distribution of ``ids``."""
    ids = np.asarray(ids).ravel()
    if ids.size == 0:
        return 0.0
    _, counts = np.unique(ids, return_counts=True)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))  # no -0.0 for a single value


def density_from(n_present: int, entropy: float) -> float:
    return math.log2(1.0 + n_present / (2.0**entropy))


def sparse_stats(ids: np.ndarray, cardinality: int, rows: int | None = None) -> DensityStats:
    """Stats of encoded ids (PAD = missing). For a sequence pass all events, and ``rows`` and
    ``coverage`` are taken over sequences by the caller via :func:`sequence_stats`."""
    ids = np.asarray(ids).ravel()
    present = ids[ids != PAD_ID]
    n = ids.size if rows is None else rows
    h = entropy_bits(present)
    return DensityStats(
        cardinality=int(cardinality),
        entropy_bits=h,
        coverage=float(present.size / n) if n else 0.0,
        oov_rate=float((present == OOV_ID).mean()) if present.size else 0.0,
        density=density_from(present.size, h),
    )


def dense_stats(values: np.ndarray) -> DensityStats:
    values = np.asarray(values, dtype=np.float64).ravel()
    present = values[~np.isnan(values)]
    return DensityStats(
        cardinality=int(np.unique(present).size),
        entropy_bits=0.0,
        coverage=float(present.size / values.size) if values.size else 0.0,
        oov_rate=0.0,
        density=density_from(present.size, 0.0),
    )


def sequence_stats(item_ids: np.ndarray, cardinality: int) -> DensityStats:
    """``item_ids`` is ``[rows, L]`` with PAD padding: coverage counts non-empty sequences,
    entropy and OOV are over the events."""
    item_ids = np.asarray(item_ids)
    events = item_ids[item_ids != PAD_ID]
    h = entropy_bits(events)
    rows = item_ids.shape[0]
    return DensityStats(
        cardinality=int(cardinality),
        entropy_bits=h,
        coverage=float((item_ids != PAD_ID).any(axis=1).mean()) if rows else 0.0,
        oov_rate=float((events == OOV_ID).mean()) if events.size else 0.0,
        density=density_from(events.size, h),
    )
