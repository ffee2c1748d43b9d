"""Amazon review categories (``<Category>.txt`` + ``<Category>_item2attributes.json``) as
DIN-style CTR samples with a behaviour history.

Input format (the S3-Rec/CL4SRec preprocessing of the 5-core Amazon reviews):
- ``<Category>.txt``: one line per user, ``user_id item_1 ... item_n``, items in time order;
- ``<Category>_item2attributes.json``: ``{"item": [attribute ids]}``; the first id is the
  brand, the rest category-path tokens (the last one is the most specific category).

Construction (see docs/datasets.md): every interaction after a user's first is a positive whose
history is the items before it (most recent first, capped at ``max_len``); each positive gets one
negative with the same history and an item drawn uniformly from the items the user never
touched. Per user, the last positive and its negative are test, the one before valid, the rest
train. Candidate and history events carry the item id, its brand (first attribute) and its
category (last attribute; missing when the item has fewer than two attributes).

The helpers :func:`history_index` and :func:`sample_untouched` are shared with other
sequence loaders (taobao).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, register_loader

MISSING = -1


def history_index(targets: np.ndarray, starts: np.ndarray, max_len: int) -> np.ndarray:
    """For events ``targets`` (indices into a flat, per-user contiguous, time-ordered event array)
    whose user's first event is at ``starts``: ``[N, max_len]`` indices of the preceding events of
    the same user, most recent first, ``-1`` past the user's first event."""
    idx = targets[:, None] - 1 - np.arange(max_len, dtype=np.int64)[None, :]
    return np.where(idx >= starts[:, None], idx, -1)


def gather(values: np.ndarray, index: np.ndarray, missing: Any = MISSING) -> np.ndarray:
    """``values[index]`` with ``missing`` where ``index`` is ``-1``."""
    return np.where(index >= 0, values[np.maximum(index, 0)], missing)


def sample_untouched(
    users: np.ndarray, n_items: int, touched: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One item in ``[0, n_items)`` per entry of ``users``, uniform over the items that user never
    touched. ``touched`` holds the sorted unique keys ``user * n_items + item``. Rejection
    sampling, vectorised; deterministic for a given ``rng`` state."""
    users = np.asarray(users, dtype=np.int64)
    # a user who touched every item has nothing to sample; say so instead of looping forever
    per_user = np.bincount(touched // n_items, minlength=int(users.max(initial=0)) + 1)
    full = np.flatnonzero(per_user >= n_items)
    if np.isin(users, full).any():
        raise ValueError("cannot sample a negative: a user has interacted with every item")
    out = rng.integers(0, n_items, users.size)
    todo = np.arange(users.size)
    while todo.size:
        keys = users[todo] * n_items + out[todo]
        pos = np.minimum(np.searchsorted(touched, keys), touched.size - 1)
        clash = touched[pos] == keys
        todo = todo[clash]
        out[todo] = rng.integers(0, n_items, todo.size)
    return out


def read_sequences(path: Path, max_users: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user ids, flat item ids, per-user start offsets + end)`` from ``<Category>.txt``."""
    users: list[str] = []
    items: list[int] = []
    offsets = [0]
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                items.extend(int(p) for p in parts[1:])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: item ids must be integers: {line.strip()[:80]!r}") from None
            users.append(parts[0])
            offsets.append(len(items))
            if max_users and len(users) >= max_users:
                break
    if not users:
        raise ValueError(f"{path}: no user sequences found")
    return np.asarray(users), np.asarray(items, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def read_attribute_table(path: Path) -> dict[str, list[int]]:
    """``<Category>_item2attributes.json``: raw item id -> attribute ids (brand first, then the
    category path from the root to the most specific category)."""
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object item -> [attribute ids]")
    return table


def attribute_column(table: dict[str, list[int]], item_ids: np.ndarray, position: int, min_len: int) -> np.ndarray:
    """Per item in ``item_ids``: its attribute at ``position`` (negative counts from the end) when it
    has at least ``min_len`` attributes, else -1."""
    out = np.full(item_ids.size, MISSING, dtype=np.int64)
    for i, item in enumerate(item_ids.tolist()):
        attrs = table.get(str(item))
        if attrs and len(attrs) >= min_len:
            out[i] = int(attrs[position])
    return out


def read_attributes(table: dict[str, list[int]], item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brand (first attribute) and category (last attribute) per item in ``item_ids``; -1 if absent."""
    return attribute_column(table, item_ids, 0, 1), attribute_column(table, item_ids, -1, 2)


@dataclass
class Samples:
    """The DIN-style rows before their columns are chosen: per row, the candidate (catalogue index),
    the history (indices into the flat event array, ``-1`` past the user's first event), the user
    and the split (0 train, 1 valid, 2 test)."""

    users: np.ndarray  # raw user ids
    catalogue: np.ndarray  # catalogue index -> raw item id
    flat: np.ndarray  # the users' events as catalogue indices, per user in time order
    attributes: dict[str, list[int]]
    candidate: np.ndarray
    history: np.ndarray  # [rows, max_len] indices into ``flat``
    user: np.ndarray  # index into ``users``
    label: np.ndarray
    split: np.ndarray

    def columns(self, brand: np.ndarray, cate: np.ndarray) -> dict[str, np.ndarray]:
        hist_item = gather(self.flat, self.history)
        return {
            "label": self.label,
            "user_id": self.users[self.user],
            "item_id": self.catalogue[self.candidate],
            "brand": brand[self.candidate],
            "cate": cate[self.candidate],
            "hist_item_id": gather(self.catalogue, hist_item),
            "hist_brand": gather(brand, hist_item),
            "hist_cate": gather(cate, hist_item),
        }

    def split_columns(self, cols: dict[str, np.ndarray]) -> RawSplits:
        return {name: {k: v[self.split == code] for k, v in cols.items()}
                for code, name in enumerate(("train", "valid", "test"))}


def build_samples(data_dir: Path, spec: Any, path: str = "amazon", category: str = "Sports_and_Outdoors",
                  seed: int = 2026, max_users: int = 0, **_: Any) -> Samples:
    """The rows of one category (the spec's ``source`` options; any other option is ignored)."""
    root = Path(data_dir) / path
    seq_file = root / f"{category}.txt"
    attr_file = root / f"{category}_item2attributes.json"
    for f in (seq_file, attr_file):
        if not f.exists():
            raise FileNotFoundError(f"Amazon data not found: {f} (set CTRSERVE_DATA_DIR or source path/category)")
    max_len = spec.sequences[0].max_len if spec.sequences else 50

    users, flat_raw, offsets = read_sequences(seq_file, int(max_users))
    attributes = read_attribute_table(attr_file)
    catalogue, flat = np.unique(flat_raw, return_inverse=True)  # dense item index 0..n_items-1
    n_items = catalogue.size

    lengths = np.diff(offsets)
    user_of = np.repeat(np.arange(users.size), lengths)
    start_of = np.repeat(offsets[:-1], lengths)
    pos_in_user = np.arange(flat.size) - start_of
    targets = np.flatnonzero(pos_in_user >= 1)  # the history needs at least one item
    t_user = user_of[targets]
    # 0 = the user's last interaction, 1 = the one before, ...
    from_end = (offsets[1:][t_user] - 1) - targets
    split_of = np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0))

    touched = np.unique(user_of * n_items + flat)
    neg = sample_untouched(t_user, n_items, touched, np.random.default_rng(seed))
    hist = history_index(targets, start_of[targets], max_len)

    # rows: each positive followed by its negative
    n = targets.size
    cand = np.empty(2 * n, dtype=np.int64)
    cand[0::2], cand[1::2] = flat[targets], neg
    return Samples(users=users, catalogue=catalogue, flat=flat, attributes=attributes, candidate=cand,
                   history=np.repeat(hist, 2, axis=0), user=np.repeat(t_user, 2),
                   label=np.tile(np.array([1.0, 0.0], dtype=np.float32), n), split=np.repeat(split_of, 2))


@register_loader("amazon")
def load(data_dir: Path, spec: Any, **source: Any) -> RawSplits:
    samples = build_samples(data_dir, spec, **source)
    brand, cate = read_attributes(samples.attributes, samples.catalogue)
    return samples.split_columns(samples.columns(brand, cate))
