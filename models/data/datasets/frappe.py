"""Frappe (the 10-field AFN/FuxiCTR/BARS copy): libsvm files with global one-hot indices.

Each line is ``label idx:1 ...`` with exactly one index per field; a field's raw value is
its index minus the field's offset. Splits are the canonical train/valid/test files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import RawSplits, register_loader

FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
OFFSETS = [0, 957, 5039, 5046, 5053, 5055, 5058, 5060, 5069, 5149]


def read_libsvm(path: Path) -> dict[str, np.ndarray]:
    rows = []
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            rows.append([int(parts[0])] + [int(p.split(":", 1)[0]) for p in parts[1:]])
    arr = np.asarray(rows, dtype=np.int64)
    if arr.shape[1] != len(FIELDS) + 1:
        raise ValueError(f"{path}: expected {len(FIELDS)} fields per line, got {arr.shape[1] - 1}")
    cols = {"label": arr[:, 0].astype(np.float32)}
    for j, (name, off) in enumerate(zip(FIELDS, OFFSETS, strict=True)):
        cols[name] = arr[:, j + 1] - off
    return cols


@register_loader("frappe_libsvm")
def load(data_dir: Path, spec: Any, path: str = "frappe", **_: Any) -> RawSplits:
    root = Path(data_dir) / path
    if not root.exists():
        raise FileNotFoundError(f"Frappe data not found at {root} (set CTRSERVE_DATA_DIR)")
    return {split: read_libsvm(root / f"{split}.libsvm") for split in ("train", "valid", "test")}
