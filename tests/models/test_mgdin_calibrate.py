"""MGDIN's calibrate round trip: static masks from a trained run, reloaded and evaluated alike; fine-tuning
with static masks keeps them and the epoch best on valid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mgdin_small import SMALL

from ctrserve.models.layers.deferred import deferred_k


@pytest.mark.slow
def test_calibrate_round_trip_through_load_run(tiny_prepared, tmp_path) -> None:
    from ctrserve.contract.prepared import load_split
    from ctrserve.models.calibrate import calibrate_run
    from ctrserve.models.train.config import RunConfig, TrainSettings
    from ctrserve.models.train.trainer import evaluate, load_run, train

    cfg = RunConfig(model="mgdin", dataset="synthetic", seed=7, params=dict(SMALL),
                    train=TrainSettings(batch_size=256, max_epochs=1, max_train_rows=600, threads=1))
    result = train(cfg, tiny_prepared, tmp_path / "runs", progress=False)
    new_dir, metrics, info = calibrate_run(result.run_dir, rows=300, command="test")

    assert new_dir != result.run_dir and new_dir.parent.parent.parent == tmp_path / "runs"
    cal = json.loads((new_dir / "calibration.json").read_text())
    assert cal["rows"] == 300 and cal["seed"] == 7 and cal["windows"] == info["windows"]
    for w in cal["windows"]:
        m = w["groups"]
        assert w["k"] == deferred_k(m, (0.33, 0.66, 1.0))
        assert [np.sum(layer) for layer in w["masks"]] == w["k"]
        assert w["mask_density"] == [k / (m * m) for k in w["k"]]
        # the share of each layer's per-sample pairs the static mask keeps: all of them where k = m²
        assert all(0.0 <= o <= 1.0 for o in w["overlap_with_dynamic"]) and w["overlap_with_dynamic"][-1] == 1.0
    assert metrics["variant"] == "static_masks" and metrics["seed"] == 7
    # the serving choice follows the valid split's AUC cost of static masks against the budget
    delta = cal["static_valid"]["auc"] - cal["dynamic_valid"]["auc"]
    assert cal["valid_auc_delta_static_minus_dynamic"] == pytest.approx(delta)
    assert cal["serving_mode"] == ("static" if -delta <= 0.002 else "dynamic")
    q = cal["test_prediction_shift"]
    assert 0.0 <= q["p50"] <= q["p99"] <= q["max"] <= 1.0 and q["mean"] <= q["max"]

    cfg2, fmap, model = load_run(new_dir)
    assert cfg2.variant == "static_masks" and cfg2.seed == 7 and cfg2.params["mask_mode"] == "static"
    assert model.mask_mode == "static" and bool(model.masks_calibrated)
    for w, branch in zip(cal["windows"], model.branches, strict=True):
        assert branch.static_masks.to(torch.int64).tolist() == w["masks"]
    test = load_split(tiny_prepared, "test")
    again = evaluate(model, test, fmap)
    assert again["auc"] == pytest.approx(metrics["auc"], abs=1e-9)
    assert again["auc"] == pytest.approx(cal["static_test"]["auc"], abs=1e-9)
    # the source run is untouched and still dynamic
    _, _, source = load_run(result.run_dir)
    assert source.mask_mode == "dynamic" and not bool(source.masks_calibrated)


@pytest.mark.slow
def test_finetuning_with_static_masks_keeps_them_and_the_epoch_best_on_valid(tiny_prepared, tmp_path) -> None:
    from ctrserve.models.calibrate import calibrate_run
    from ctrserve.models.train.config import RunConfig, TrainSettings
    from ctrserve.models.train.trainer import load_run, train

    cfg = RunConfig(model="mgdin", dataset="synthetic", seed=7, params=dict(SMALL),
                    train=TrainSettings(batch_size=256, max_epochs=1, max_train_rows=600, threads=1, lr=3e-3))
    result = train(cfg, tiny_prepared, tmp_path / "runs", progress=False)
    plain_dir, _, plain = calibrate_run(result.run_dir, rows=300)
    tuned_dir, metrics, info = calibrate_run(result.run_dir, rows=300, finetune_epochs=3)
    f = info["finetune"]
    assert len(f["valid_auc_by_epoch"]) == 4 and f["lr"] == pytest.approx(3e-4)
    # epoch 0 is the calibrated model as it was: the plain calibration's valid AUC
    assert f["valid_auc_by_epoch"][0] == pytest.approx(plain["static_valid"]["auc"], abs=1e-9)
    best = max(range(4), key=lambda e: (f["valid_auc_by_epoch"][e], -e))
    assert f["chosen_epoch"] == best
    assert info["static_valid"]["auc"] == pytest.approx(f["valid_auc_by_epoch"][best], abs=1e-9)
    assert metrics["variant"] == "static_masks_finetuned" and "fine-tuned" in metrics["notes"]
    # the masks are the calibrated ones: fine-tuning moves weights, never the masks
    _, _, before = load_run(plain_dir)
    _, _, after = load_run(tuned_dir)
    for b, a in zip(before.branches, after.branches, strict=True):
        assert torch.equal(b.static_masks, a.static_masks)
    moved = any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters(), strict=True))
    assert moved == (best > 0)
