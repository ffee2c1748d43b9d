"""The trainer end to end on tiny synthetic data: run dir contents, reload, results records."""

from __future__ import annotations

import json

import pytest
import torch

from ctrserve.models.train.config import parse_set, resolve_config
from ctrserve.models.train.results import load_results, record_result, render_markdown
from ctrserve.models.train.trainer import Plateau, evaluate, load_run, train, train_step

pytestmark = pytest.mark.quick


def test_train_writes_a_complete_run_dir(tiny_prepared, tmp_path) -> None:
    cfg = resolve_config("dnn", "synthetic", overrides={"train": {"max_epochs": 2, "batch_size": 256},
                                                        "model": {"embedding_dim": 4, "hidden": [8]}}, seed=3)
    result = train(cfg, tiny_prepared, tmp_path, command="pytest", progress=False)
    run = result.run_dir
    for name in ("config.yaml", "feature_map.json", "vocab.json", "model.pt", "metrics.json", "curve.png"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert (metrics["seed"], metrics["dataset"], metrics["epochs"]) == (3, "synthetic", len(history))
    # the best epoch's weights were restored: its valid AUC is the best one in the history
    best = max(history, key=lambda h: h["valid_auc"])
    assert (metrics["best_epoch"], metrics["best_valid_auc"]) == (best["epoch"], best["valid_auc"])
    assert metrics["params"] == sum(p.numel() for p in result.model.parameters())
    # weights_only reload reproduces the test metrics exactly
    _, fmap, model = load_run(run)
    from ctrserve.contract.prepared import load_split

    again = evaluate(model, load_split(tiny_prepared, "test"), fmap)
    assert again["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    torch.load(run / "model.pt", weights_only=True)


def test_config_merge_order_and_errors() -> None:
    cfg = resolve_config("dcnv2", "frappe", overrides=parse_set(["train.lr=0.01", "model.cross_layers=2"]))
    assert cfg.params["embedding_dim"] == 16 and cfg.params["dropout"] == 0.2  # frappe block over Base
    assert cfg.params["cross_layers"] == 2 and cfg.train.lr == 0.01
    assert cfg.train.embedding_reg == 0.05
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["oops"])
    # YAML 1.1 reads off/on/yes/no as booleans; an option's words must stay words
    assert parse_set(["semantic_ids.mode=off", "a=no", "b=true", "c=False", "d=0.5"]) == {
        "semantic_ids": {"mode": "off"}, "a": "no", "b": True, "c": False, "d": 0.5}
    with pytest.raises(ValueError):
        resolve_config("dnn", "frappe", overrides={"train": {"no_such_setting": 1}})


def test_results_upsert_and_markdown(tmp_path) -> None:
    path = tmp_path / "results.json"
    base = {"model": "dnn", "dataset": "toy", "variant": "default", "auc": 0.7, "gauc": 0.6, "logloss": 0.5,
            "params": 10, "epoch_seconds": 1.0, "command": "ctrserve train ..."}
    record_result({**base, "seed": 1}, path)
    record_result({**base, "seed": 2, "auc": 0.8}, path)
    record_result({**base, "seed": 1, "auc": 0.9}, path)  # replaces seed 1
    rows = load_results(path)
    assert [(r["seed"], r["auc"]) for r in rows] == [(1, 0.9), (2, 0.8)]
    md = render_markdown(rows)
    assert "| dnn | default | 2 | 0.8500 ± 0.0707" in md
    with pytest.raises(ValueError, match="lacks"):
        record_result({"model": "x"}, path)


def test_micro_batches_give_the_same_step(tiny_fmap, tiny_batch) -> None:
    """``train.micro_batches``: the batch in slices, one optimiser step — the same loss and the same
    parameters after the step as the whole batch at once (a model without BatchNorm or dropout)."""
    from ctrserve.models.registry import build_model

    batch, labels = tiny_batch
    after = []
    for micro in (1, 3):
        torch.manual_seed(0)
        model = build_model("dnn", tiny_fmap, {"hidden": [16], "dropout": 0.0, "batch_norm": False})
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loss = train_step(model, opt, torch.nn.BCEWithLogitsLoss(), batch, labels, 0.05, micro)
        after.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-5)
    for a, b in zip(after[0][1], after[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _actions(plateau: Plateau, aucs: list[float]) -> list[str]:
    return [plateau.update(epoch, a) for epoch, a in enumerate(aucs, start=1)]


def test_plateau_cuts_then_stops_and_min_epochs_holds_both_off() -> None:
    aucs = [0.70, 0.69, 0.72, 0.71, 0.705, 0.73, 0.72, 0.71]
    # default (min_epochs 0): the first worse epoch cuts the lr, the second in a row stops the run
    assert _actions(Plateau(patience=2), aucs[:5]) == ["best", "cut", "best", "cut", "stop"]
    # min_epochs 6: epochs 2, 4 and 5 are worse but before epoch 6, so nothing happens until 7
    held = Plateau(patience=2, min_epochs=6)
    assert _actions(held, aucs) == ["best", "keep", "best", "keep", "keep", "best", "cut", "stop"]
    assert (held.best_epoch, held.best_auc) == (6, 0.73)
    # the epoch min_epochs itself already counts
    assert _actions(Plateau(patience=2, min_epochs=2), [0.7, 0.6, 0.5]) == ["best", "cut", "stop"]


def test_min_epochs_reaches_the_trainer(tiny_prepared, tmp_path, monkeypatch) -> None:
    from ctrserve.models.train import trainer

    real = trainer.evaluate
    scripted = iter([0.7, 0.6, 0.6, 0.6] * 2)  # the valid AUC of epochs 1-4: only the first is a best

    def falling(*args, **kwargs) -> dict[str, float]:
        return {**real(*args, **kwargs), "auc": next(scripted)}

    monkeypatch.setattr(trainer, "evaluate", falling)

    def lrs(min_epochs: int) -> list[float]:
        cfg = resolve_config("dnn", "synthetic", seed=3, overrides={
            "train": {"max_epochs": 4, "patience": 2, "min_epochs": min_epochs, "batch_size": 256, "lr": 1e-3},
            "model": {"embedding_dim": 4, "hidden": [8]}})
        return [h["lr"] for h in train(cfg, tiny_prepared, tmp_path, progress=False).history]

    assert lrs(0) == pytest.approx([1e-3, 1e-3, 1e-4])  # epoch 2 cuts the lr, epoch 3 stops
    assert lrs(3) == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4])  # epoch 2 is held; 3 cuts, 4 stops
