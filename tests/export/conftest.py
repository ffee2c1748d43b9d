"""Export fixtures: seeded run directories for every model with tiny parameters (the real
``tritonserver`` fixture is shared: tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest


def make_run(prepared: Path, dest: Path, model_name: str, params: dict, seed: int = 0) -> Path:
    """A run directory like ``ctrserve train`` writes, with seeded random weights instead of
    training (parity does not need a good model) and non-trivial BatchNorm statistics.

    ``mask_mode: static`` params are calibrated on training rows (``calibration.json``), like
    ``ctrserve calibrate`` does."""
    import torch
    import yaml

    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.models.registry import build_model
    from ctrserve.models.train.config import RunConfig

    fmap = FeatureMap.load(prepared / "feature_map.json")
    torch.manual_seed(seed)
    model = build_model(model_name, fmap, params)
    with torch.no_grad():
        for p in model.parameters():  # embeddings init at 1e-4: scale up so outputs vary by row
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    dest.mkdir(parents=True)
    if params.get("mask_mode") == "static":
        from ctrserve.contract.prepared import load_split
        from ctrserve.models.calibrate import calibrate_model

        info = calibrate_model(model, load_split(prepared, "train"), fmap)
        (dest / "calibration.json").write_text(json.dumps(info))
    cfg = RunConfig(model=model_name, dataset=fmap.dataset, seed=seed, params=params)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    fmap.save(dest / "feature_map.json")
    (dest / "vocab.json").write_text((prepared / "vocab.json").read_text())
    (dest / "prepared_dir.txt").write_text(str(prepared.resolve()))
    torch.save(model.state_dict(), dest / "model.pt")
    (dest / "metrics.json").write_text(json.dumps({"model": model_name, "auc": 0.5, "logloss": 0.69}))
    return dest


@pytest.fixture(scope="session")
def make_run_dir(tiny_prepared: Path) -> Callable[..., Path]:
    """``make_run_dir(dest, model_name, params, seed=0)`` on the tiny prepared dataset."""
    return lambda dest, model_name, params, seed=0: make_run(tiny_prepared, dest, model_name, params, seed)


@pytest.fixture(scope="session")
def run_factory(tiny_prepared: Path, tiny_params: dict[str, dict],
                tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def factory(model_name: str, seed: int = 0) -> Path:
        if model_name not in tiny_params:
            pytest.fail(f"no tiny parameters for model {model_name!r}: add it to TINY_PARAMS in tests/conftest.py")
        key = (model_name, seed)
        if key not in cache:
            dest = tmp_path_factory.mktemp("runs") / f"{model_name}-s{seed}"
            cache[key] = make_run(tiny_prepared, dest, model_name, tiny_params[model_name], seed)
        return cache[key]

    return factory
