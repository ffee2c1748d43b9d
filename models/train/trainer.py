"""One trainer for every registered model: Adam, BCE on logits, FuxiCTR-style embedding L2,
lr cut on a valid-AUC plateau, early stopping, best-epoch restore, test metrics, run dir."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ctrserve.contract.feature_map import FeatureMap
from ctrserve.contract.prepared import USER_KEY, load_split

from ..registry import build_model
from .batches import BatchIterator
from .config import RunConfig
from .metrics import auc, auc_se_by_users, gauc, logloss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def embedding_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared weights over every ``nn.Embedding`` (FuxiCTR's embedding_regularizer)."""
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            total = total + m.weight.pow(2).sum()
    return total


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batch: dict[str, torch.Tensor],
               labels: torch.Tensor, embedding_reg: float = 0.0, micro_batches: int = 1) -> float:
    """One optimiser step on ``batch``; returns its loss. ``micro_batches > 1``: forward and backward
    slice by slice, each slice's mean loss weighted by its share of the rows, so the summed gradient is
    the whole batch's (the embedding penalty once) while only one slice's activations are alive."""
    optimizer.zero_grad(set_to_none=True)
    n, total = len(labels), 0.0
    slices = torch.arange(n).tensor_split(min(micro_batches, n))
    for i, rows in enumerate(slices):
        b, y = (batch, labels) if len(slices) == 1 else ({k: v[rows] for k, v in batch.items()}, labels[rows])
        part = loss_fn(model(b), y) * (len(rows) / n)
        if embedding_reg and i == len(slices) - 1:  # once, with the last slice: one slice = the plain step
            part = part + 0.5 * embedding_reg * embedding_penalty(model)
        part.backward()
        total += float(part.detach())
    optimizer.step()
    return total


@torch.no_grad()
def predict(model: nn.Module, arrays: dict[str, np.ndarray], fmap: FeatureMap, batch_size: int) -> np.ndarray:
    """Click probabilities for every row of a split, in order."""
    model.eval()
    out = [torch.sigmoid(model(b)).numpy() for b, _ in BatchIterator(arrays, fmap, batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate(
    model: nn.Module, arrays: dict[str, np.ndarray], fmap: FeatureMap, batch_size: int = 16384
) -> dict[str, float]:
    return score_predictions(predict(model, arrays, fmap, batch_size), arrays, fmap)


def score_predictions(probs: np.ndarray, arrays: dict[str, np.ndarray], fmap: FeatureMap) -> dict[str, float]:
    """AUC, GAUC and LogLoss of ``probs`` against the split's labels."""
    labels = arrays[fmap.label]
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, arrays[USER_KEY]),
        "logloss": logloss(labels, probs),
    }


@dataclass
class Plateau:
    """The valid-AUC schedule: a better epoch is kept ("best"); a worse one cuts the lr ("cut") until
    ``patience`` of them in a row stop the run ("stop"). Before epoch ``min_epochs`` a worse epoch does
    nothing ("keep"): one noisy early valid AUC would otherwise cut the lr for the rest of the run."""

    patience: int
    min_epochs: int = 0
    best_auc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, valid_auc: float) -> str:
        if valid_auc > self.best_auc:
            self.best_auc, self.best_epoch, self.bad_epochs = valid_auc, epoch, 0
            return "best"
        if epoch < self.min_epochs:
            return "keep"
        self.bad_epochs += 1
        return "stop" if self.bad_epochs >= self.patience else "cut"


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def make_run_dir(runs_dir: Path, cfg: RunConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    run_dir = runs_dir / cfg.dataset_id / cfg.model / f"{cfg.variant}-s{cfg.seed}-{stamp}"
    run_dir.mkdir(parents=True)
    return run_dir


def train(
    cfg: RunConfig,
    prepared_dir: Path,
    runs_dir: Path,
    command: str = "",
    model_hook: Callable[[nn.Module, dict[str, np.ndarray]], None] | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on a prepared dataset and write a run directory.

    ``model_hook(model, train_arrays)`` runs after training (best weights restored) and before
    the test evaluation; models use it for post-training steps such as mask calibration.
    ``on_epoch(epoch, valid_metrics)`` runs after each epoch's validation (a tuner's pruning hook:
    an exception it raises stops the run before anything is written).
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(cfg.seed)
    fmap = FeatureMap.load(prepared_dir / "feature_map.json")
    train_arrays = load_split(prepared_dir, "train")
    if t.max_train_rows and t.max_train_rows < fmap.num_rows["train"]:
        train_arrays = {k: v[: t.max_train_rows] for k, v in train_arrays.items()}
    valid_arrays = load_split(prepared_dir, "valid")
    test_arrays = load_split(prepared_dir, "test")

    model = build_model(cfg.model, fmap, cfg.params)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.net_reg)
    loss_fn = nn.BCEWithLogitsLoss()
    batches = BatchIterator(train_arrays, fmap, t.batch_size, shuffle=True, seed=cfg.seed)

    history: list[dict[str, float]] = []
    plateau, best_state = Plateau(t.patience, t.min_epochs), None
    epoch_seconds: list[float] = []
    for epoch in range(1, t.max_epochs + 1):
        model.train()
        start, total, n = time.perf_counter(), 0.0, 0
        bar = tqdm(batches, desc=f"{cfg.model} epoch {epoch}", leave=False, disable=None if progress else True)
        for batch, labels in bar:
            total += train_step(model, optimizer, loss_fn, batch, labels, t.embedding_reg, t.micro_batches) \
                * len(labels)
            n += len(labels)
        epoch_seconds.append(time.perf_counter() - start)
        valid = evaluate(model, valid_arrays, fmap, t.eval_batch_size)
        lr = optimizer.param_groups[0]["lr"]
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "lr": lr,
                        **{f"valid_{k}": v for k, v in valid.items()}})
        if progress:
            print(f"epoch {epoch}: train_loss={total / max(n, 1):.4f} valid_auc={valid['auc']:.4f} "
                  f"valid_logloss={valid['logloss']:.4f} lr={lr:g} ({epoch_seconds[-1]:.1f}s)", flush=True)
        if on_epoch is not None:
            on_epoch(epoch, valid)
        action = plateau.update(epoch, valid["auc"])
        if action == "best":
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif action == "stop":
            break
        elif action == "cut":
            for group in optimizer.param_groups:
                group["lr"] *= t.lr_decay
    if best_state is not None:
        model.load_state_dict(best_state)
    if model_hook is not None:
        model_hook(model, train_arrays)

    test_probs = predict(model, test_arrays, fmap, t.eval_batch_size)
    test = score_predictions(test_probs, test_arrays, fmap)
    test["auc_se"] = auc_se_by_users(test_arrays[fmap.label], test_probs, test_arrays[USER_KEY])
    run_dir = make_run_dir(runs_dir, cfg)
    metrics = {
        "model": cfg.model, **cfg.dataset_record(), "variant": cfg.variant, "seed": cfg.seed,
        **test, "best_epoch": plateau.best_epoch, "best_valid_auc": plateau.best_auc,
        "params": count_params(model), "epoch_seconds": float(np.mean(epoch_seconds)),
        "epochs": len(history), "tokens": len(fmap.token_names()), "command": command,
    }
    write_run(run_dir, cfg, fmap, prepared_dir, model, metrics, history)
    return TrainResult(run_dir=run_dir, metrics=metrics, model=model, history=history)


def write_run(
    run_dir: Path, cfg: RunConfig, fmap: FeatureMap, prepared_dir: Path, model: nn.Module,
    metrics: dict[str, Any], history: list[dict[str, float]],
) -> None:
    from .plots import plot_curve

    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    fmap.save(run_dir / "feature_map.json")
    vocab = prepared_dir / "vocab.json"
    if vocab.exists():
        (run_dir / "vocab.json").write_text(vocab.read_text())
    (run_dir / "prepared_dir.txt").write_text(str(Path(prepared_dir).resolve()))
    torch.save(model.state_dict(), run_dir / "model.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    plot_curve(history, run_dir / "curve.png", title=f"{cfg.model} on {cfg.dataset_id} (seed {cfg.seed})")


def load_run(run_dir: Path) -> tuple[RunConfig, FeatureMap, nn.Module]:
    """Rebuild a trained model from its run directory (weights loaded with weights_only=True)."""
    run_dir = Path(run_dir)
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    fmap = FeatureMap.load(run_dir / "feature_map.json")
    model = build_model(cfg.model, fmap, cfg.params)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return cfg, fmap, model
