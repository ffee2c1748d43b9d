"""Vocabularies: raw categorical values -> ids, with PAD=0 and OOV=1 reserved."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .feature_map import OOV_ID, PAD_ID


def is_missing(value: object) -> bool:
    """Raw loaders mark a missing categorical value as ``""``, ``None`` or a negative integer."""
    if value is None or value == "":
        return True
    return isinstance(value, int) and value < 0


class Vocabulary:
    """Raw value (as a string) -> id. Ids 0 (PAD) and 1 (OOV) are reserved; known values get
    2.. in order of decreasing training frequency, so low ids are popular values."""

    def __init__(self, values: list[str]):
        self.values = list(values)
        self.index = {v: i + 2 for i, v in enumerate(self.values)}

    @classmethod
    def fit(cls, columns: Iterable[np.ndarray], min_count: int = 1) -> Vocabulary:
        counts: dict[str, int] = {}
        for col in columns:
            uniq, cnt = np.unique(np.asarray(col), return_counts=True)
            for u, c in zip(uniq.tolist(), cnt.tolist(), strict=True):
                if not is_missing(u):
                    key = str(u)
                    counts[key] = counts.get(key, 0) + c
        kept = [v for v, c in counts.items() if c >= min_count]
        kept.sort(key=lambda v: (-counts[v], v))
        return cls(kept)

    def __len__(self) -> int:
        """Table size, PAD and OOV included."""
        return len(self.values) + 2

    def encode(self, column: np.ndarray) -> np.ndarray:
        """Map raw values to ids: unknown -> OOV, missing -> PAD (see :func:`is_missing`)."""
        col = np.asarray(column)
        uniq, inverse = np.unique(col, return_inverse=True)
        ids = np.array(
            [PAD_ID if is_missing(u) else self.index.get(str(u), OOV_ID) for u in uniq.tolist()],
            dtype=np.int64,
        )
        return ids[inverse].reshape(col.shape)

    def lookup(self, value: object) -> int:
        """One raw value -> id (the online path's encoder; same rules as :meth:`encode`)."""
        return PAD_ID if is_missing(value) else self.index.get(str(value), OOV_ID)

    def to_json(self) -> list[str]:
        return self.values
