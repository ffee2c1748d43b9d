"""``ctrserve demo``: the main job end to end on an embedded default (the seeded synthetic
dataset, no files needed): prepare data, train a small model, evaluate it, print metrics.

Each step is a function so later stages (export, feature store, gateway) chain onto it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()

DEMO_DATA = {"n_rows": 60000, "n_users": 5000, "n_items": 2000, "n_cates": 30, "max_len": 50}
DEMO_TRAIN = {"train": {"max_epochs": 4, "batch_size": 1024, "lr": 2e-3}}


def step_train(model: str, work_dir: Path, seed: int) -> Path:
    """Prepare the demo dataset (reused if present) and train ``model``; returns the run dir."""
    from ctrserve.models.cli import ensure_prepared
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train

    prepared = ensure_prepared("synthetic", DEMO_DATA)
    cfg = resolve_config(model, "synthetic", overrides=DEMO_TRAIN, seed=seed, variant="demo")
    console.print(f"[bold]training[/] {model} on synthetic ({DEMO_DATA['n_rows']:,} rows)")
    result = train(cfg, prepared, work_dir / "runs", command="ctrserve demo", progress=False)
    m = result.metrics
    console.print(f"[bold green]test[/] AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  LogLoss {m['logloss']:.4f}  "
                  f"({m['params']:,} params, {m['epoch_seconds']:.1f} s/epoch) -> {result.run_dir}")
    return result.run_dir


def demo_cmd(
    model: Annotated[str, typer.Option(help="registered model to train")] = "deepfm",
    seed: Annotated[int, typer.Option(help="random seed")] = 2026,
) -> None:
    """Run the main job end to end on the embedded synthetic dataset and print the result."""
    from ctrserve.paths import settings

    step_train(model, settings().work_dir, seed)
