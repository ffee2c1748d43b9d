"""Frappe with its app metadata: the canonical libsvm splits joined on the item with ``raw/meta.csv``.

The libsvm item index minus its field offset is the ``item`` column of ``raw/frappe.csv`` and
``raw/meta.csv`` (every train positive's user–item pair is a pair of the raw log: checked in
tests/data/test_frappe_meta.py), so the join is on that id. Added per row:

- item side, from the metadata: category, downloads (an ordinal band), developer, language,
  rating (dense), price in dollars (dense, log); apps without metadata (550 of 4,082) have
  ``unknown`` everywhere, read as missing;
- item side, from the training split: the item's count of positives (popularity);
- user side, from the training split: the user's count of positives and of distinct categories.

The aggregates are one value per item or per user, computed once on the training split and used
for every split, so a row's own label does not move its value (no target leak beyond what an id
embedding learns from the same rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import RawSplits, register_loader
from .frappe import load as load_libsvm

META_SPARSE = ["category", "downloads", "developer", "language"]
MISSING = "unknown"


def read_meta(path: Path) -> pd.DataFrame:
    """The metadata table indexed by item, with ``unknown`` as missing and prices in dollars."""
    if not path.exists():
        raise FileNotFoundError(f"Frappe app metadata not found: {path} (set CTRSERVE_DATA_DIR)")
    meta = pd.read_csv(path, sep="\t", usecols=["item", *META_SPARSE, "price", "rating"], dtype=str)
    meta = meta.set_index(meta["item"].astype(np.int64)).drop(columns="item")
    out = pd.DataFrame(index=meta.index)
    for col in META_SPARSE:
        out[col] = meta[col].where(meta[col] != MISSING, "").fillna("")
    out["rating"] = pd.to_numeric(meta["rating"], errors="coerce")
    price = meta["price"].str.replace("$", "", regex=False).replace({"Free": "0"})
    out["price_usd"] = pd.to_numeric(price, errors="coerce")
    return out


def _aggregates(train: dict[str, np.ndarray], meta: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    pos = pd.DataFrame({"user": train["user"], "item": train["item"]})[train["label"] == 1]
    item_pop = pos.groupby("item").size()
    pos["category"] = meta["category"].reindex(pos["item"]).to_numpy()
    users = pd.DataFrame({
        "user_positives": pos.groupby("user").size(),
        "user_categories": pos[pos["category"] != ""].groupby("user")["category"].nunique(),
    }).fillna(0)
    return item_pop, users


def join_meta(split: dict[str, np.ndarray], meta: pd.DataFrame, item_pop: pd.Series,
              users: pd.DataFrame) -> dict[str, np.ndarray]:
    """One split's columns plus the metadata and aggregate columns, row for row."""
    out = dict(split)
    rows = meta.reindex(split["item"])
    for col in META_SPARSE:
        out[col] = rows[col].fillna("").to_numpy(dtype=object).astype(str)
    for col in ("rating", "price_usd"):
        out[col] = rows[col].to_numpy(dtype=np.float64)
    out["item_pop"] = item_pop.reindex(split["item"]).fillna(0).to_numpy(dtype=np.float64)
    per_user = users.reindex(split["user"]).fillna(0)
    for col in users.columns:
        out[col] = per_user[col].to_numpy(dtype=np.float64)
    return out


@register_loader("frappe_meta")
def load(data_dir: Path, spec: Any, path: str = "frappe", **_: Any) -> RawSplits:
    splits = load_libsvm(data_dir, spec, path=path)
    meta = read_meta(Path(data_dir) / path / "raw" / "meta.csv")
    item_pop, users = _aggregates(splits["train"], meta)
    return {name: join_meta(cols, meta, item_pop, users) for name, cols in splits.items()}
