"""Avazu mobile-ads sample (the first ~8,000 rows of the Kaggle training file).

``train.csv`` has a header; ``dev.csv`` (valid) and ``test.csv`` have the same columns without
one. ``id`` is dropped; ``hour`` (``YYMMDDHH``) becomes ``hour_of_day`` and ``weekday``; every
other column is categorical and kept as its raw string (``-1`` in C20 is a value, not missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, read_split_files, register_loader

COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
           "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
           "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
CATEGORICAL = COLUMNS[3:]
FILES = {"train": "train.csv", "valid": "dev.csv", "test": "test.csv"}


def read_csv(path: Path, max_rows: int = 0) -> dict[str, np.ndarray]:
    import pandas as pd

    with open(path) as fh:
        has_header = fh.readline().startswith("id,")
    df = pd.read_csv(path, header=0 if has_header else None, dtype=str, keep_default_na=False,
                     nrows=max_rows or None)
    if df.shape[1] != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} comma-separated columns, got {df.shape[1]}")
    df.columns = COLUMNS
    if not df["click"].isin(["0", "1"]).all():
        raise ValueError("click must be 0 or 1")
    when = pd.to_datetime(df["hour"], format="%y%m%d%H", errors="coerce")
    if when.isna().any():
        bad = df["hour"][when.isna()].iloc[0]
        raise ValueError(f"hour must be YYMMDDHH, got {bad!r}")
    cols: dict[str, np.ndarray] = {"click": df["click"].astype(np.float32).to_numpy()}
    for c in CATEGORICAL:
        cols[c] = df[c].to_numpy(dtype=str)
    cols["hour_of_day"] = when.dt.hour.to_numpy(dtype=np.int64)
    cols["weekday"] = when.dt.weekday.to_numpy(dtype=np.int64)
    return cols


@register_loader("avazu_csv")
def load(data_dir: Path, spec: Any, path: str = "avazu_sample", max_rows: int = 0, **_: Any) -> RawSplits:
    return read_split_files(Path(data_dir) / path, FILES, read_csv, "Avazu sample", max_rows)
