"""Numeric feature encodings, applied the same way offline (``data prepare``) and online (the
gateway's assembly of request-supplied values): the dense normalisation and the quantile buckets.
The parameters come from the feature map (``FeatureInfo.transform``)."""

from __future__ import annotations

import json

import numpy as np

from .feature_map import PAD_ID


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
