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


def _user_draws(users: np.ndarray, rounds: int, seed: int):
    """Row weights of ``rounds`` bootstrap draws over users: each draw takes the split's users with
    replacement and weights each row by its user's draw count (rows of one user are not
    independent, so resampling rows would understate the spread). Deterministic for ``seed``."""
    _, user_idx = np.unique(np.asarray(users), return_inverse=True)
    n_users = int(user_idx.max()) + 1 if user_idx.size else 0
    rng = np.random.default_rng(seed)
    for _ in range(rounds if n_users >= 2 else 0):
        yield np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)[user_idx]


def auc_se_by_users(labels: np.ndarray, scores: np.ndarray, users: np.ndarray, rounds: int = 200,
                    seed: int = 0) -> float:
    """Standard error of the AUC by bootstrap over users (``_user_draws``)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    aucs = []
    for weight in _user_draws(users, rounds, seed):
        keep = weight > 0
        if np.unique(labels[keep]).size == 2:
            aucs.append(roc_auc_score(labels[keep], scores[keep], sample_weight=weight[keep]))
    return float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan")


def paired_auc_gap_by_users(labels: np.ndarray, a: np.ndarray, b: np.ndarray, users: np.ndarray,
                            rounds: int = 1000, seed: int = 0) -> dict[str, float]:
    """``AUC(a) − AUC(b)`` on the same rows and its spread by bootstrap over users, the same draw for
    both scores in every round: what the two share (which users the split holds) cancels, so the
    gap's standard error is far smaller than either AUC's. ``ci_low``/``ci_high``: the 2.5 / 97.5
    percentiles; ``share_above``: the share of rounds where ``a`` wins."""
    labels, a, b = np.asarray(labels), np.asarray(a), np.asarray(b)
    gaps = []
    for weight in _user_draws(users, rounds, seed):
        keep = weight > 0
        if np.unique(labels[keep]).size == 2:
            y, w = labels[keep], weight[keep]
            gaps.append(roc_auc_score(y, a[keep], sample_weight=w) - roc_auc_score(y, b[keep], sample_weight=w))
    g, gap = np.asarray(gaps), auc(labels, a) - auc(labels, b)
    if g.size < 2:
        return {"gap": gap, **dict.fromkeys(("se", "ci_low", "ci_high", "share_above"), float("nan"))}
    return {"gap": gap, "se": float(g.std(ddof=1)), "ci_low": float(np.quantile(g, 0.025)),
            "ci_high": float(np.quantile(g, 0.975)), "share_above": float((g > 0).mean())}
