"""Seeded synthetic CTR data with the heterogeneity the papers describe.

- dense numeric features with a clear signal (item quality, price, user age);
- high-cardinality sparse ids with power-law (Zipf) popularity (users, items);
- a behaviour sequence per user (latest first) drawn mostly from the user's preferred
  categories; the share of history events in the candidate's category drives the click.

A user's history is fixed per user (like a feature-store snapshot), so the same features
are available offline and online. Everything is a function of ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, register_loader


def _zipf_probs(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


def generate(
    n_rows: int = 200_000,
    n_users: int = 20_000,
    n_items: int = 5_000,
    n_cates: int = 50,
    max_len: int = 50,
    seed: int = 2026,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    item_pop = _zipf_probs(n_items, 1.1)
    item_cate = rng.integers(0, n_cates, n_items)
    item_quality = rng.normal(0, 1, n_items)
    item_price = np.exp(rng.normal(3, 1, n_items))
    cate_items = [np.flatnonzero(item_cate == c) for c in range(n_cates)]

    user_segment = rng.integers(0, 8, n_users)
    user_age = rng.normal(35, 10, n_users).clip(16, 80)
    user_bias = rng.normal(0, 0.5, 8)[user_segment] + (user_age - 35) / 40
    # preferred categories: 3 per user; history lengths spread from empty to max_len
    prefs = rng.integers(0, n_cates, (n_users, 3))
    lengths = np.minimum(rng.geometric(1.0 / max(2, max_len // 3), n_users) - 1, max_len)
    hist_item = np.full((n_users, max_len), -1, dtype=np.int64)
    for u in range(n_users):
        n = lengths[u]
        if n == 0:
            continue
        from_pref = rng.random(n) < 0.8
        cates = np.where(from_pref, prefs[u, rng.integers(0, 3, n)], rng.integers(0, n_cates, n))
        hist_item[u, :n] = [rng.choice(cate_items[c]) if cate_items[c].size else 0 for c in cates]
    hist_cate = np.where(hist_item >= 0, item_cate[np.maximum(hist_item, 0)], -1)

    user_pop = _zipf_probs(n_users, 0.8)
    users = rng.choice(n_users, n_rows, p=user_pop)
    items = rng.choice(n_items, n_rows, p=item_pop)
    device = rng.integers(0, 3, n_rows)
    hour = rng.integers(0, 24, n_rows)

    cand_cate = item_cate[items]
    hc = hist_cate[users]
    n_hist = np.maximum((hc >= 0).sum(axis=1), 1)
    relevance = (hc == cand_cate[:, None]).sum(axis=1) / n_hist
    logit = (
        -1.2
        + 3.0 * relevance
        + 1.0 * item_quality[items]
        + user_bias[users]
        - 0.3 * np.log(item_price[items] / 20.0)
        + 0.4 * (device == 0)
        + 0.3 * np.sin(hour / 24 * 2 * np.pi)
    )
    label = (rng.random(n_rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return {
        "label": label,
        "user_id": users,
        "segment": user_segment[users],
        "age": user_age[users].astype(np.float32),
        "item_id": items,
        "cate_id": cand_cate,
        "price": item_price[items].astype(np.float32),
        "quality": item_quality[items].astype(np.float32),
        "device": device,
        "hour": hour,
        "hist_item_id": hist_item[users],
        "hist_cate_id": hist_cate[users],
    }


@register_loader("synthetic")
def load(data_dir: Path, spec: Any, seed: int = 2026, **params: Any) -> RawSplits:
    seqs = spec.sequences
    max_len = seqs[0].max_len if seqs else 50
    cols = generate(max_len=max_len, seed=seed, **params)
    n = cols["label"].shape[0]
    order = np.random.default_rng(seed + 1).permutation(n)
    cut1, cut2 = int(0.8 * n), int(0.9 * n)
    parts = {"train": order[:cut1], "valid": order[cut1:cut2], "test": order[cut2:]}
    return {split: {k: v[idx] for k, v in cols.items()} for split, idx in parts.items()}
