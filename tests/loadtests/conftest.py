"""Load-test fixtures: a tiny run directory (seeded weights, no training) on the tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory like ``ctrserve train`` writes, for a small DNN (latency, not quality)."""
    import torch
    import yaml

    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.models.registry import build_model
    from ctrserve.models.train.config import RunConfig

    fmap = FeatureMap.load(tiny_prepared / "feature_map.json")
    params = {"embedding_dim": 8, "hidden": [16, 16]}
    torch.manual_seed(0)
    model = build_model("dnn", fmap, params).eval()
    dest = tmp_path_factory.mktemp("runs") / "dnn-tiny"
    dest.mkdir()
    cfg = RunConfig(model="dnn", dataset=fmap.dataset, seed=0, params=params)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    fmap.save(dest / "feature_map.json")
    (dest / "vocab.json").write_text((tiny_prepared / "vocab.json").read_text())
    (dest / "prepared_dir.txt").write_text(str(tiny_prepared.resolve()))
    torch.save(model.state_dict(), dest / "model.pt")
    (dest / "metrics.json").write_text(json.dumps({"model": "dnn", "auc": 0.5, "logloss": 0.69}))
    return dest
