"""Amazon reviews with a wide feature set (``amazon_sports_wide``): the ``amazon`` rows plus
category-path levels, item popularity and aggregates of the user's history.

Same rows, labels, negatives and splits as ``amazon`` (one ``build_samples``). Added per row:

- item side: the category path's second and third levels (``cate_l2``, ``cate_l3``; the first is
  the category itself, one value) beside the leaf ``cate``; ``item_pop``, the item's positives in
  the training split (one value per item);
- history field ``hist_cate_l2`` beside the item, brand and leaf category of each event;
- user side, computed from the row's own history (which precedes the row, so nothing from its
  future): length, distinct leaf categories, the most frequent leaf category and second level,
  and the share of the history in its most frequent brand.

The spec adds three candidate–history match features (share of the history in the candidate's
brand and category, recency of the last same-category event): ``data prepare`` and the gateway
compute them from the encoded inputs with one function, so they are not loader columns.

At serving time the user aggregates are profile features of the user's latest row (the bulk load
takes each user's latest row), so they describe the same history the stored sequence holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, register_loader
from .amazon import MISSING, attribute_column, build_samples, gather, read_attributes


def row_mode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``[n, L]`` ids (-1 missing): the most frequent id (ties: the smallest; -1 for an
    empty row) and its count."""
    srt = np.sort(values, axis=1)
    n, width = srt.shape
    pos = np.arange(width)
    new_run = np.ones_like(srt, dtype=bool)
    new_run[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, pos, 0), axis=1)
    run_len = np.where(srt >= 0, pos - run_start + 1, 0)
    best = run_len.argmax(axis=1)
    count = run_len[np.arange(n), best]
    return np.where(count > 0, srt[np.arange(n), best], MISSING), count


def distinct(values: np.ndarray) -> np.ndarray:
    """Distinct non-missing ids per row of ``[n, L]`` ids."""
    srt = np.sort(values, axis=1)
    new = np.ones_like(srt, dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return (new & (srt >= 0)).sum(axis=1)


def history_aggregates(hist_item: np.ndarray, brand: np.ndarray, cate: np.ndarray,
                       cate_l2: np.ndarray) -> dict[str, np.ndarray]:
    """The user-side columns from each row's history (``hist_item``: catalogue indices, -1 padding)."""
    length = (hist_item >= 0).sum(axis=1)
    hist_cate = gather(cate, hist_item)
    _, top_brand_count = row_mode(gather(brand, hist_item))
    return {
        "hist_len": length.astype(np.float64),
        "hist_cates": distinct(hist_cate).astype(np.float64),
        "hist_top_cate": row_mode(hist_cate)[0],
        "hist_top_l2": row_mode(gather(cate_l2, hist_item))[0],
        "hist_brand_loyalty": np.where(length > 0, top_brand_count / np.maximum(length, 1), np.nan),
    }


@register_loader("amazon_wide")
def load(data_dir: Path, spec: Any, **source: Any) -> RawSplits:
    samples = build_samples(data_dir, spec, **source)
    table, catalogue = samples.attributes, samples.catalogue
    brand, cate = read_attributes(table, catalogue)
    # attributes: brand, then the category path from the category itself down to the leaf
    cate_l2, cate_l3 = attribute_column(table, catalogue, 2, 3), attribute_column(table, catalogue, 3, 4)
    cols = samples.columns(brand, cate)
    cand, hist_item = samples.candidate, gather(samples.flat, samples.history)
    cols["cate_l2"], cols["cate_l3"] = cate_l2[cand], cate_l3[cand]
    cols["hist_cate_l2"] = gather(cate_l2, hist_item)
    train_positive = (samples.split == 0) & (samples.label == 1)
    cols["item_pop"] = np.bincount(cand[train_positive], minlength=catalogue.size).astype(np.float64)[cand]
    cols.update(history_aggregates(hist_item, brand, cate, cate_l2))
    return samples.split_columns(cols)
