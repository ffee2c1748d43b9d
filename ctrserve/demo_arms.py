"""The demo's two arms: a baseline (``--model``, DeepFM by default) and MGDIN with static
(precomputed) masks, both trained on the demo's synthetic data, each exported to the demo's
model repository and routed 50/50 by one routing config.

Runs are reused across demos: a finished demo run of the model and seed (``find_demo_run``), and
for MGDIN the static-mask run ``ctrserve calibrate`` wrote from that demo run (``find_static_run``).
With ``--model mgdin`` the baseline is MGDIN with per-request (dynamic) masks, the run the
static-mask arm was calibrated from: the same weights served both ways."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

console = Console()

DEMO_DATA = {"n_rows": 60000, "n_users": 5000, "n_items": 2000, "n_cates": 30, "max_len": 50}
#: one epoch: on this data both arms' models peak at epoch 1 (valid AUC by epoch, seed 2026: DeepFM
#: 0.785, 0.777, 0.766; MGDIN 0.784, 0.779, 0.758) and the trainer keeps the best epoch's weights,
#: so more epochs only cost time (no learning-rate schedule: epoch 1 is the same either way)
DEMO_TRAIN = {"train": {"max_epochs": 1, "batch_size": 1024, "lr": 2e-3}}
#: the treatment arm: MGDIN, calibrated to static masks, under this name in the model repository
TREATMENT_MODEL = "mgdin"
TREATMENT = "mgdin_static"
#: the calibration sample (train rows): the demo's whole train split is ~48k rows
CALIBRATION_ROWS = 10_000


@dataclass(frozen=True)
class DemoArm:
    """One arm of the demo's experiment: its name (also its name in the model repository) and run."""

    name: str
    run_dir: Path


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


def find_demo_run(model: str, work_dir: Path, seed: int) -> Path | None:
    """The newest finished demo run of ``model`` with ``seed`` (a run dir with weights and metrics)."""
    runs = sorted((work_dir / "runs" / "synthetic" / model).glob(f"demo-s{seed}-*"))
    done = [r for r in runs if (r / "model.pt").exists() and (r / "metrics.json").exists()]
    return done[-1] if done else None


def find_static_run(source: Path) -> Path | None:
    """The newest static-mask run calibrated from ``source`` (``calibration.json`` names it)."""
    from ctrserve.models.calibrate import static_variant

    runs = sorted(source.parent.glob(f"{static_variant('demo')}-s*"), reverse=True)
    for run in runs:
        try:
            info = json.loads((run / "calibration.json").read_text())
        except (OSError, ValueError):
            continue  # an unfinished calibration
        if Path(info.get("source_run", "")) == source.resolve() and (run / "model.pt").exists():
            return run
    return None


def demo_run(model: str, work_dir: Path, seed: int, retrain: bool) -> Path:
    """A finished demo run of ``model``: the last one unless ``retrain``, else a new one."""
    run_dir = None if retrain else find_demo_run(model, work_dir, seed)
    if run_dir is None:
        from ctrserve.models.registry import list_models

        if model not in list_models():
            raise ValueError(f"unknown model {model!r}; registered: {', '.join(list_models())}")
        return step_train(model, work_dir, seed)
    m = json.loads((run_dir / "metrics.json").read_text())
    console.print(f"[bold]training[/] reusing {run_dir} (test AUC {m['auc']:.4f}; --retrain to train again)")
    return run_dir


def step_calibrate(source: Path) -> Path:
    """The static-mask run of the MGDIN demo run ``source`` (``ctrserve calibrate``; reused)."""
    found = find_static_run(source)
    if found is not None:
        console.print(f"[bold]calibrate[/] reusing {found}")
        return found
    from ctrserve.models.calibrate import calibrate_run

    t0 = time.perf_counter()
    new_dir, _, info = calibrate_run(source, CALIBRATION_ROWS, command="ctrserve demo")
    d, s = info["dynamic_valid"]["auc"], info["static_valid"]["auc"]
    overlap = [round(min(w["overlap_with_dynamic"]), 3) for w in info["windows"]]
    console.print(f"[bold]calibrate[/] MGDIN static masks from A0 over {info['rows']:,} train rows in "
                  f"{time.perf_counter() - t0:.1f} s: valid AUC dynamic {d:.4f} -> static {s:.4f}; lowest overlap "
                  f"with per-request masks per window {overlap} -> {new_dir}")
    if info["serving_mode"] != "static":  # the demo serves static masks anyway: they are the treatment
        console.print(f"[yellow]note:[/] on this run static masks cost {d - s:.4f} valid AUC, over the serving "
                      "budget; `ctrserve calibrate` would serve per-request masks")
    return new_dir


def demo_arms(model: str, work_dir: Path, seed: int, retrain: bool) -> tuple[DemoArm, DemoArm]:
    """(baseline, treatment): ``model``'s demo run, and MGDIN's calibrated to static masks."""
    baseline = demo_run(model, work_dir, seed, retrain)
    source = baseline if model == TREATMENT_MODEL else demo_run(TREATMENT_MODEL, work_dir, seed, retrain)
    return DemoArm(model, baseline), DemoArm(TREATMENT, step_calibrate(source))


def step_export(run_dir: Path, repo: Path, name: str) -> Path:
    """Export ``run_dir`` as version 1 of ``name`` in ``repo`` (ONNX, parity-gated); reused when
    version 1 already comes from this run."""
    from ctrserve.contract.manifest import Manifest

    version_dir = repo / name / "1"
    if (version_dir / "manifest.json").exists():
        manifest = Manifest.load(version_dir)
        # a manifest from before `store` existed is exported again: the gateway needs its namespace
        if Path(manifest.run_dir) == run_dir.resolve() and manifest.store is not None:
            console.print(f"[bold]export[/] reusing {version_dir}")
            return repo
    from ctrserve.export.exporter import export_run  # torch: only when there is something to export

    t0 = time.perf_counter()
    result = export_run(run_dir, "onnx", repo, name=name, version=1, force=True)
    p = result.manifest.parity
    console.print(f"[bold]export[/] ONNX -> {result.version_dir} in {time.perf_counter() - t0:.1f} s "
                  f"(parity {'passed' if p.passed else 'FAILED'}, max |onnx - torch| {p.max_abs_diff:.1e})")
    return repo


def write_routing(path: Path, arms: tuple[DemoArm, ...]) -> Path:
    """The demo's experiment ``default``: users split evenly over ``arms`` (version 1 of each).
    The repository keeps every model a demo exported; the gateway serves the arms named here."""
    import yaml

    from ctrserve.service.routing import Arm, Experiment, RoutingConfig

    weights = [100 // len(arms)] * len(arms)
    weights[0] += 100 - sum(weights)
    config = RoutingConfig(experiments=[Experiment(name="default", salt="demo", arms=[
        Arm(name=a.name, model=a.name, version=1, weight=w) for a, w in zip(arms, weights, strict=True)])])
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path
