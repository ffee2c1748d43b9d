"""Export fixtures: seeded run directories for every model with tiny parameters (the real
``tritonserver`` fixture is shared: tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

#: tiny parameters per registered model; a model without an entry fails the export tests
#: (test_every_registered_model_has_tiny_params).
SMALL_DEEP = {"embedding_dim": 8, "hidden": [16, 16]}
TINY_PARAMS: dict[str, dict] = {
    "lr": {},
    "fm": {"embedding_dim": 8},
    "dnn": SMALL_DEEP,
    "wide_deep": SMALL_DEEP,
    "deepfm": SMALL_DEEP,
    "dcnv2": {**SMALL_DEEP, "cross_layers": 2},
    "autoint": {"embedding_dim": 8, "attention_layers": 2, "attention_dim": 8, "heads": 2, "hidden": [16]},
    "mgdin": {"embedding_dim": 8, "windows": [2], "model_dim": 8, "layers": 2, "ratios": [0.5, 1.0], "hidden": [16]},
    "dlf": {"embedding_dim": 8, "num_layers": 2, "attention_layers": 1, "rank": 2},
    "cdnet": {"embedding_dim": 8, "k": 4, "num_layers": 1, "heads": 2, "hidden": [16]},
}


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
def tiny_params() -> dict[str, dict]:
    return TINY_PARAMS


@pytest.fixture(scope="session")
def make_run_dir(tiny_prepared: Path) -> Callable[..., Path]:
    """``make_run_dir(dest, model_name, params, seed=0)`` on the tiny prepared dataset."""
    return lambda dest, model_name, params, seed=0: make_run(tiny_prepared, dest, model_name, params, seed)


@pytest.fixture(scope="session")
def run_factory(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def factory(model_name: str, seed: int = 0) -> Path:
        if model_name not in TINY_PARAMS:
            pytest.fail(f"no tiny parameters for model {model_name!r}: add it to TINY_PARAMS in "
                        "tests/export/conftest.py")
        key = (model_name, seed)
        if key not in cache:
            dest = tmp_path_factory.mktemp("runs") / f"{model_name}-s{seed}"
            cache[key] = make_run(tiny_prepared, dest, model_name, TINY_PARAMS[model_name], seed)
        return cache[key]

    return factory
