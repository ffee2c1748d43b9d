"""Taobao UserBehavior (Tianchi) as CTR samples with long behaviour sequences (CDNet setting).

Input: ``user_id,item_id,category_id,behavior_type,timestamp`` without a header, one row per
event (pv/cart/fav/buy). Construction (see docs/datasets.md):
- events are ordered per user by timestamp (stable: file order breaks ties);
- targets are a user's events that have at least ``min_history`` earlier events, of which the
  last ``max_targets`` are kept; each is a positive, whatever its behaviour type;
- history = all of the user's earlier events (item, category), most recent first, ``max_len``;
- split per user by time: the last ``ceil(test_frac * k)`` of a user's ``k`` targets are test,
  the ``ceil(valid_frac * k)`` before them valid, the rest train;
- the catalogue (``catalogue="train"``, default) is the set of items of the events up to each
  user's last train target (what train rows show as targets or, uncut, in histories); valid/test
  targets whose item is outside it are dropped, since a model cannot know an item it never saw
  (with ``catalogue="all"`` they are kept: 39-42 % of the valid/test positives were such cold
  items against 4 % of the negatives, docs/datasets.md);
- each positive gets one negative: same user, history and hour, an item drawn uniformly from the
  catalogue items the user never touched, with that item's category.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, register_loader
from .amazon import gather, history_index, sample_untouched

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
CHINA_UTC_OFFSET = 8 * 3600  # the events are from Beijing time; the hour feature uses local time


def read_events(path: Path, max_users: int = 0) -> dict[str, np.ndarray]:
    import pandas as pd

    df = pd.read_csv(path, header=None, names=COLUMNS, dtype={"behavior_type": str})
    if df.empty:
        raise ValueError(f"{path}: no events")
    if df[["user_id", "item_id", "category_id", "timestamp"]].isna().any().any():
        raise ValueError(f"{path}: rows with missing user, item, category or timestamp")
    if max_users:
        keep = df["user_id"].drop_duplicates().iloc[: int(max_users)]
        df = df[df["user_id"].isin(keep)]
    return {c: df[c].to_numpy() for c in COLUMNS}


def _by_user(ev: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray]:
    """Events sorted by (user in order of first appearance, timestamp), stably; with each event's
    dense user index, the users' event counts, each event's user start and position in its user."""
    _, first, user_dense = np.unique(ev["user_id"], return_index=True, return_inverse=True)
    user_rank = np.argsort(np.argsort(first))[user_dense]
    order = np.lexsort((ev["timestamp"], user_rank))
    ev = {k: v[order] for k, v in ev.items()}
    user_of = user_rank[order]
    counts = np.bincount(user_of, minlength=int(user_of.max()) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    start_of = starts[user_of]
    return ev, user_of, counts, start_of, np.arange(user_of.size) - start_of


@register_loader("taobao")
def load(
    data_dir: Path,
    spec: Any,
    path: str = "taobao_userbehavior",
    file: str = "UserBehavior_head.csv",
    seed: int = 2026,
    min_history: int = 5,
    max_targets: int = 40,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    max_users: int = 0,
    catalogue: str = "train",
    **_: Any,
) -> RawSplits:
    csv = Path(data_dir) / path / file
    if not csv.exists():
        raise FileNotFoundError(f"Taobao UserBehavior data not found at {csv} (set CTRSERVE_DATA_DIR)")
    if min_history < 1 or max_targets < 1:
        raise ValueError("taobao: min_history and max_targets must be >= 1")
    if catalogue not in ("train", "all"):
        raise ValueError(f"taobao: catalogue must be 'train' or 'all', got {catalogue!r}")
    max_len = spec.sequences[0].max_len if spec.sequences else 200
    ev, user_of, counts, start_of, pos_in_user = _by_user(read_events(csv, int(max_users)))
    n_users = counts.size

    # targets: >= min_history earlier events, the last max_targets of each user
    from_end = counts[user_of] - 1 - pos_in_user
    targets = np.flatnonzero((pos_in_user >= min_history) & (from_end < max_targets))
    if targets.size == 0:
        raise ValueError(f"taobao: no user has more than min_history={min_history} events")
    t_user = user_of[targets]
    k = np.bincount(t_user, minlength=n_users)[t_user]  # targets of this user
    rank = from_end[targets]  # 0 = the user's last target
    n_test = np.ceil(test_frac * k).astype(np.int64)
    n_valid = np.ceil(valid_frac * k).astype(np.int64)
    split_of = np.where(rank < n_test, 2, np.where(rank < n_test + n_valid, 1, 0))

    items, item_dense = np.unique(ev["item_id"], return_inverse=True)
    # an item's category: the one of its first event (the public data has one per item)
    _, first_ev = np.unique(item_dense, return_index=True)
    item_cate = ev["category_id"][first_ev]
    hist = history_index(targets, start_of[targets], max_len)
    if catalogue == "train":
        # events up to a user's last train target: what train rows show at any history length
        train = split_of == 0
        last_train = np.full(n_users, -1, dtype=np.int64)
        np.maximum.at(last_train, t_user[train], pos_in_user[targets[train]])
        pool = np.unique(item_dense[pos_in_user <= last_train[user_of]])
        keep = train | np.isin(item_dense[targets], pool)
        targets, t_user, split_of, hist = targets[keep], t_user[keep], split_of[keep], hist[keep]
    else:
        pool = np.arange(items.size)
    # negatives: uniform over the pool items the user never touched (sampled as pool positions)
    slot = np.full(items.size, -1, dtype=np.int64)
    slot[pool] = np.arange(pool.size)
    in_pool = slot[item_dense] >= 0
    touched = np.unique(user_of[in_pool].astype(np.int64) * pool.size + slot[item_dense[in_pool]])
    neg = pool[sample_untouched(t_user, pool.size, touched, np.random.default_rng(seed))]

    n = targets.size
    cand = np.empty(2 * n, dtype=np.int64)
    cand[0::2], cand[1::2] = item_dense[targets], neg
    rows_hist = np.repeat(hist, 2, axis=0)
    hours = ((ev["timestamp"][targets] + CHINA_UTC_OFFSET) // 3600) % 24
    cols = {
        "label": np.tile(np.array([1.0, 0.0], dtype=np.float32), n),
        "user_id": np.repeat(ev["user_id"][targets], 2),
        "item_id": items[cand],
        "cate_id": item_cate[cand],
        "hour": np.repeat(hours, 2),
        "hist_item_id": gather(ev["item_id"], rows_hist),
        "hist_cate_id": gather(ev["category_id"], rows_hist),
    }
    row_split = np.repeat(split_of, 2)
    return {
        name: {key: v[row_split == code] for key, v in cols.items()}
        for code, name in enumerate(("train", "valid", "test"))
    }
