"""Taobao UserBehavior (Tianchi) as CTR samples with long behaviour sequences (CDNet setting).

Input: ``user_id,item_id,category_id,behavior_type,timestamp`` without a header, one row per
event (pv/cart/fav/buy). Construction (docs/datasets.md), one set of rules for every split:
- global time cutoffs in Beijing time: events before ``warmup_end`` are history only and give the
  item and category vocabulary; targets from ``warmup_end`` to ``valid_start`` are train, to
  ``test_start`` valid, after it test. Ids first seen after the warm-up are out of vocabulary in
  every split alike (the loader hands ``prepare`` the warm-up's ids to fit on, ``VOCAB_KEY``), so
  train sees cold items at about the rate valid and test do;
- a target is any event after the warm-up with at least ``min_history`` earlier events of its user;
  each is a positive, whatever its behaviour type, with the user's earlier events (item, category)
  as history, most recent first, ``max_len``;
- each positive gets one negative (same user, history and hour) drawn from the items that exist at
  the target's time (first seen, by anyone, before it) and that the user has not touched up to that
  time: nothing from the future, the same draw in every split. ``negatives``: ``popularity``
  (default: an item of the positive's warm-up popularity bucket, ``floor(log2(1 + count))``, where 0
  is an item unseen in the warm-up, i.e. out of vocabulary: a candidate's OOV id says nothing about
  its label), ``category`` (the positive's category and bucket 0-or-not) or ``uniform`` (any item: the
  OOV id then tells the label, kept to show that). An empty matched pool falls back to ``uniform``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import VOCAB_KEY, RawSplits, register_loader
from .amazon import gather, history_index

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
CHINA_UTC_OFFSET = 8 * 3600  # the events are from Beijing time; days and the hour feature use local time
NEGATIVES = ("popularity", "category", "uniform")
MAX_DRAWS = 64  # rejection rounds before a row falls back to the uniform pool


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


def local_day_start(day: str) -> int:
    """``YYYY-MM-DD`` (Beijing time) -> the UTC timestamp of its midnight."""
    try:
        return int(np.datetime64(day, "s").astype(np.int64)) - CHINA_UTC_OFFSET
    except ValueError:
        raise ValueError(f"taobao: {day!r} is not a YYYY-MM-DD date") from None


def negative_groups(mode: str, item_cate: np.ndarray, warm_count: np.ndarray) -> np.ndarray:
    """Each item's pool for ``mode``: a negative is drawn from its positive's pool. Popularity
    buckets are ``floor(log2(1 + warm-up events))``; bucket 0 holds the items unseen in the warm-up."""
    bucket = np.floor(np.log2(1 + warm_count)).astype(np.int64)
    if mode == "popularity":
        return bucket
    if mode == "category":
        return np.unique(item_cate, return_inverse=True)[1].astype(np.int64) * 2 + (bucket > 0)
    return np.zeros(item_cate.size, dtype=np.int64)


class ExistingItems:
    """Draws items first seen before a time from a pool, skipping those a user touched by then.

    ``first_seen`` per item; ``touch_keys`` sorted unique ``user * n_items + item`` with
    ``touch_time`` the user's first event on that item."""

    def __init__(self, group: np.ndarray, first_seen: np.ndarray, touch_keys: np.ndarray, touch_time: np.ndarray):
        self.n_items = group.size
        self.order = np.lexsort((first_seen, group))  # items by (pool, first seen)
        self.group_sorted, self.seen_sorted = group[self.order], first_seen[self.order]
        self.touch_keys, self.touch_time = touch_keys, touch_time

    def _touched(self, users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.minimum(np.searchsorted(self.touch_keys, keys), self.touch_keys.size - 1)
        return (self.touch_keys[pos] == keys) & (self.touch_time[pos] <= times)

    def draw(self, groups: np.ndarray, users: np.ndarray, times: np.ndarray, rng: np.random.Generator
             ) -> np.ndarray:
        """One item per row from the row's pool, first seen before ``times``, untouched by the user
        up to then; ``-1`` where none was found in ``MAX_DRAWS`` rounds (or the pool is empty)."""
        lo = np.searchsorted(self.group_sorted, groups, side="left")
        # items of the group first seen strictly before the row's time: a prefix of the group
        key = self.group_sorted.astype(np.float64) * 4e9 + self.seen_sorted
        hi = np.searchsorted(key, groups.astype(np.float64) * 4e9 + times, side="left")
        size = hi - lo
        out = np.full(groups.size, -1, dtype=np.int64)
        todo = np.flatnonzero(size > 0)
        for _ in range(MAX_DRAWS):
            if not todo.size:
                break
            pick = self.order[lo[todo] + (rng.random(todo.size) * size[todo]).astype(np.int64)]
            ok = ~self._touched(users[todo], pick, times[todo])
            out[todo[ok]] = pick[ok]
            todo = todo[~ok]
        return out


@register_loader("taobao")
def load(
    data_dir: Path,
    spec: Any,
    path: str = "taobao_userbehavior",
    file: str = "UserBehavior_head.csv",
    seed: int = 2026,
    min_history: int = 5,
    warmup_end: str = "2017-11-30",
    valid_start: str = "2017-12-02",
    test_start: str = "2017-12-03",
    negatives: str = "popularity",
    max_users: int = 0,
    **_: Any,
) -> RawSplits:
    csv = Path(data_dir) / path / file
    if not csv.exists():
        raise FileNotFoundError(f"Taobao UserBehavior data not found at {csv} (set CTRSERVE_DATA_DIR)")
    if min_history < 1:
        raise ValueError("taobao: min_history must be >= 1")
    if negatives not in NEGATIVES:
        raise ValueError(f"taobao: negatives must be one of {NEGATIVES}, got {negatives!r}")
    cuts = np.array([local_day_start(d) for d in (warmup_end, valid_start, test_start)])
    if not (np.diff(cuts) > 0).all():
        raise ValueError("taobao: warmup_end < valid_start < test_start is required")
    max_len = spec.sequences[0].max_len if spec.sequences else 200
    ev, user_of, _, start_of, pos_in_user = _by_user(read_events(csv, int(max_users)))
    times = ev["timestamp"].astype(np.int64)
    targets = np.flatnonzero((times >= cuts[0]) & (pos_in_user >= min_history))
    if targets.size == 0:
        raise ValueError(f"taobao: no event after {warmup_end} has min_history={min_history} earlier events")
    split_of = np.searchsorted(cuts, times[targets], side="right") - 1  # 0 train, 1 valid, 2 test

    items, item_dense = np.unique(ev["item_id"], return_inverse=True)
    # an item's category: the one of its first event (the public data has one per item)
    _, first_ev = np.unique(item_dense, return_index=True)
    item_cate = ev["category_id"][first_ev]
    warm = times < cuts[0]
    first_seen = np.full(items.size, np.iinfo(np.int64).max)
    np.minimum.at(first_seen, item_dense, times)
    keys = user_of.astype(np.int64) * items.size + item_dense
    touch_keys, inverse = np.unique(keys, return_inverse=True)
    touch_time = np.full(touch_keys.size, np.iinfo(np.int64).max)
    np.minimum.at(touch_time, inverse, times)
    group = negative_groups(negatives, item_cate, np.bincount(item_dense[warm], minlength=items.size))
    rng = np.random.default_rng(seed)
    pools = ExistingItems(group, first_seen, touch_keys, touch_time)
    t_users, t_times = user_of[targets].astype(np.int64), times[targets]
    neg = pools.draw(group[item_dense[targets]], t_users, t_times, rng)
    if (miss := np.flatnonzero(neg < 0)).size:
        uniform = ExistingItems(np.zeros_like(group), first_seen, touch_keys, touch_time)
        neg[miss] = uniform.draw(np.zeros(miss.size, np.int64), t_users[miss], t_times[miss], rng)
    keep = neg >= 0  # no untouched item existed yet: the row has no negative and is left out
    targets, split_of, neg = targets[keep], split_of[keep], neg[keep]
    return _rows(ev, items, item_cate, item_dense, targets, start_of, neg, split_of, max_len, warm)


def _rows(ev: dict[str, np.ndarray], items: np.ndarray, item_cate: np.ndarray, item_dense: np.ndarray,
          targets: np.ndarray, start_of: np.ndarray, neg: np.ndarray, split_of: np.ndarray, max_len: int,
          warm: np.ndarray) -> RawSplits:
    """Positive then negative row per target, split by ``split_of``; plus the warm-up's ids."""
    n = targets.size
    cand = np.empty(2 * n, dtype=np.int64)
    cand[0::2], cand[1::2] = item_dense[targets], neg
    rows_hist = np.repeat(history_index(targets, start_of[targets], max_len), 2, axis=0)
    hours = ((ev["timestamp"][targets] + CHINA_UTC_OFFSET) // 3600) % 24
    cols = {
        "label": np.tile(np.array([1.0, 0.0], dtype=np.float32), n),
        "user_id": np.repeat(ev["user_id"][targets], 2),
        "item_id": items[cand],
        "cate_id": item_cate[cand],
        "hour": np.repeat(hours, 2),
        "hist_item_id": gather(ev["item_id"].astype(np.int32), rows_hist),
        "hist_cate_id": gather(ev["category_id"].astype(np.int32), rows_hist),
    }
    row_split = np.repeat(split_of, 2)
    out: RawSplits = {
        name: {key: v[row_split == code] for key, v in cols.items()}
        for code, name in enumerate(("train", "valid", "test"))
    }
    # the vocabularies: the ids of the warm-up events only, for candidates and histories alike
    out[VOCAB_KEY] = {"item_id": ev["item_id"][warm], "cate_id": ev["category_id"][warm]}
    return out
