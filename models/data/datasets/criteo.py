"""Criteo display-ads sample (the first ~8,000 rows of the Kaggle training file).

``train.tsv``/``dev.tsv``/``test.tsv``: tab-separated, no header: label, I1-I13 (integer counts,
some negative, empty = missing), C1-C26 (hashed categorical, empty = missing). ``dev`` is the
valid split. Criteo has no user id: the loader adds a constant ``gauc_group`` column, so GAUC
equals AUC on this dataset (one group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, read_split_files, register_loader

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *DENSE, *SPARSE]
FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}


def read_tsv(path: Path, max_rows: int = 0) -> dict[str, np.ndarray]:
    import pandas as pd

    df = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False,
                     nrows=max_rows or None)
    if df.shape[1] != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} tab-separated columns, got {df.shape[1]}")
    df.columns = COLUMNS
    if not df["label"].isin(["0", "1"]).all():
        raise ValueError("labels must be 0 or 1")
    cols: dict[str, np.ndarray] = {"label": df["label"].astype(np.float32).to_numpy()}
    for c in DENSE:
        # empty -> NaN (missing); anything else must be a number
        cols[c] = pd.to_numeric(df[c].replace("", np.nan), errors="raise").astype(np.float32).to_numpy()
    for c in SPARSE:
        cols[c] = df[c].to_numpy(dtype=str)
    cols["gauc_group"] = np.zeros(len(df), dtype=np.int64)
    return cols


@register_loader("criteo_tsv")
def load(data_dir: Path, spec: Any, path: str = "criteo_sample", max_rows: int = 0, **_: Any) -> RawSplits:
    return read_split_files(Path(data_dir) / path, FILES, read_tsv, "Criteo sample", max_rows)
