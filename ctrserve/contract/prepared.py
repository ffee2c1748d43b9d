"""The on-disk layout of a prepared dataset (``work/processed/<name>``, written by ``ctrserve data
prepare``): ``feature_map.json``, ``vocab.json`` (table -> raw values; id = index + 2) and one
columnar ``<split>.npz`` per split, each holding every feature map input, the label and the
user grouping column. The trainer, the exporter's parity gate and the feature store's bulk load
all read it through here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
#: GAUC grouping column stored with every split (the raw user id's index)
USER_KEY = "__user__"
FEATURE_MAP_FILE = "feature_map.json"
VOCAB_FILE = "vocab.json"


def load_split(prepared_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Every column of one split (never pickled objects)."""
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `ctrserve data prepare` first")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
