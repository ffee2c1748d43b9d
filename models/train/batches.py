"""Fast mini-batches straight from columnar numpy arrays (no per-row Python)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ctrserve.contract.feature_map import FeatureMap


class BatchIterator:
    """Yields ``({input: tensor}, labels)`` over a prepared split, optionally shuffled per epoch."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        feature_map: FeatureMap,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ):
        self.inputs = {f.name: arrays[f.name] for f in feature_map.features}
        self.labels = arrays[feature_map.label].astype(np.float32)
        self.n = len(self.labels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        order = self.rng.permutation(self.n) if self.shuffle else None
        for start in range(0, self.n, self.batch_size):
            if order is None:
                sl = slice(start, start + self.batch_size)
                batch = {k: torch.from_numpy(v[sl]) for k, v in self.inputs.items()}
                yield batch, torch.from_numpy(self.labels[sl])
            else:
                idx = order[start : start + self.batch_size]
                batch = {k: torch.from_numpy(v[idx]) for k, v in self.inputs.items()}
                yield batch, torch.from_numpy(self.labels[idx])
