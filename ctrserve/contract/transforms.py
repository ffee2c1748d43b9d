"""Numeric feature encodings, applied the same way offline (``data prepare``) and online (the
gateway's assembly of request-supplied values): the dense normalisation, the quantile buckets and
the candidate–history match features. The parameters come from the feature map
(``FeatureInfo.transform`` and ``FeatureInfo.derived``)."""

from __future__ import annotations

import json

import numpy as np

from .feature_map import OOV_ID, PAD_ID


def apply_dense(values: np.ndarray, params: dict[str, float | str]) -> np.ndarray:
    """Normalise a dense column with training parameters; missing (NaN) becomes 0."""
    x = np.asarray(values, dtype=np.float64)
    kind = params["kind"]
    if kind == "log":
        x = np.log1p(np.maximum(x, 0))
    if kind in ("standard", "log"):
        x = (x - float(params["mean"])) / float(params["std"])
    elif kind == "minmax":
        x = (x - float(params["min"])) / (float(params["max"]) - float(params["min"]))
    return np.nan_to_num(x, nan=0.0).astype(np.float32)


def bucket_edges(params: dict[str, float | str]) -> np.ndarray:
    """The quantile edges a bucketised feature's transform records (a JSON list)."""
    return np.asarray(json.loads(str(params["edges"])), dtype=np.float64)


def bucketise(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket ids of a numeric column: ``searchsorted(edges, x, right) + 2`` (ids 0 and 1 are
    PAD and OOV, as for every sparse feature); missing (NaN) becomes PAD."""
    x = np.asarray(values, dtype=np.float64)
    ids = np.searchsorted(edges, x, side="right") + 2
    return np.where(np.isnan(x), PAD_ID, ids).astype(np.int64)


def history_match(events: np.ndarray, target: np.ndarray, op: str) -> np.ndarray:
    """How a candidate's value relates to one history field, on encoded ids: ``events`` ``[N, L]``
    (most recent first, PAD = 0; one row is shared by every candidate) and ``target`` ``[N]``.

    - ``share``: the fraction of the history's events with the candidate's value;
    - ``recency``: ``1 - i / L`` for the most recent such event at position ``i``, 0 without one.

    PAD and OOV never match (an unknown value says nothing about a known one). ``float32 [N]``."""
    events = np.asarray(events)
    target = np.asarray(target).reshape(-1)
    if events.ndim != 2:
        raise ValueError(f"history_match: events must be [N, L], got shape {events.shape}")
    events = np.broadcast_to(events, (target.shape[0], events.shape[1]))
    hit = (events == target[:, None]) & (target[:, None] > OOV_ID)
    if op == "share":
        length = (events != PAD_ID).sum(axis=1)
        return (hit.sum(axis=1) / np.maximum(length, 1)).astype(np.float32)
    if op == "recency":
        width = events.shape[1]
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), width)
        return (1.0 - first / max(width, 1)).astype(np.float32)
    raise ValueError(f"history_match: unknown op {op!r} (share, recency)")
