"""AUC, GAUC (grouped by user, impression-weighted, single-class users skipped) and LogLoss."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import log_loss, roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    return float(log_loss(labels, np.clip(probs, eps, 1 - eps), labels=[0, 1]))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups that have both classes.

    Per-group AUC is the Mann-Whitney statistic with average ranks for ties, computed for
    all groups at once: sort by group, rank scores within each group.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    order = np.lexsort((scores, groups))
    g, y, s = groups[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, g.size])
    # ranks within group: global average ranks of (group, score) pairs minus the group offset
    key = np.unique(np.stack([g, s], axis=1), axis=0, return_inverse=True)[1].ravel() if g.size else g
    ranks = rankdata(key, method="average") - np.repeat(starts, sizes)
    pos = np.add.reduceat(y, starts) if g.size else np.array([])
    rank_pos = np.add.reduceat(ranks * y, starts) if g.size else np.array([])
    neg = sizes - pos
    valid = (pos > 0) & (neg > 0)
    if not valid.any():
        return float("nan")
    group_auc = (rank_pos[valid] - pos[valid] * (pos[valid] + 1) / 2) / (pos[valid] * neg[valid])
    weights = sizes[valid]
    return float((group_auc * weights).sum() / weights.sum())


def auc_se_by_users(labels: np.ndarray, scores: np.ndarray, users: np.ndarray, rounds: int = 200,
                    seed: int = 0) -> float:
    """Standard error of the AUC by bootstrap over users: each round draws the split's users with
    replacement and weights each row by its user's draw count (rows of one user are not independent,
    so resampling rows would understate the spread). Deterministic for a given ``seed``."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    _, user_idx = np.unique(np.asarray(users), return_inverse=True)
    n_users = int(user_idx.max()) + 1 if user_idx.size else 0
    if n_users < 2 or np.unique(labels).size < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(rounds):
        weight = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)[user_idx]
        keep = weight > 0
        if np.unique(labels[keep]).size == 2:
            aucs.append(roc_auc_score(labels[keep], scores[keep], sample_weight=weight[keep]))
    return float(np.std(aucs, ddof=1))
