"""The same command twice gives the same model and the same metrics: seeds, data order and
initialisation are all fixed by the run's seed (the contest's 3-seed tables rely on it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctrserve.contract.prepared import load_split
from ctrserve.models.data.prepare import prepare
from ctrserve.models.train.config import resolve_config
from ctrserve.models.train.trainer import train

pytestmark = pytest.mark.slow

TRAIN = {"max_epochs": 1, "batch_size": 256, "threads": 1}
MODEL = {"dnn": {"embedding_dim": 4, "hidden": [8]},
         "mgdin": {"embedding_dim": 4, "hidden": [8], "windows": [1, 2], "model_dim": 8}}


@pytest.mark.parametrize("model", ["dnn", "mgdin"])
def test_two_runs_with_one_seed_are_identical_and_another_seed_differs(model: str, tiny_prepared: Path,
                                                                      tmp_path: Path) -> None:
    overrides = {"train": TRAIN, "model": MODEL[model]}
    runs = [train(resolve_config(model, "synthetic", overrides=overrides, seed=s), tiny_prepared, tmp_path / str(i),
                  progress=False) for i, s in enumerate((7, 7, 8))]
    first, again, other = (r.metrics for r in runs)
    assert first["auc"] == again["auc"] and first["logloss"] == again["logloss"]
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert other["auc"] != first["auc"]


def test_preparing_twice_gives_the_same_splits_and_codes(tmp_path: Path) -> None:
    overrides = {"n_rows": 1500, "n_users": 150, "n_items": 120, "n_cates": 8, "max_len": 6,
                 "semantic_ids": {"mode": "add"}}
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        prepare("synthetic", tmp_path, d, overrides)
    for split in ("train", "valid", "test"):
        a, b = load_split(dirs[0], split), load_split(dirs[1], split)
        assert a.keys() == b.keys() and "sid_1" in a
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split}/{k}")
    assert (dirs[0] / "vocab.json").read_bytes() == (dirs[1] / "vocab.json").read_bytes()
