"""``ctrserve calibrate``: fix MGDIN's deferred-interaction masks for serving.

A0 is computed per sample on a seeded sample of the training split, averaged per window, and
each layer's top-k_l mask of the average becomes a constant buffer (``mask_mode: static``).
The calibrated model is written as a NEW run directory (variant ``static_masks``, or
``<variant>_static_masks`` for a run of another variant; same seed,
same weights) with ``calibration.json``, and evaluated on the test split next to the
dynamic-mask model it came from, so the two are compared on identical weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

if TYPE_CHECKING:  # torch is imported inside the functions: `ctrserve` must start without it
    from torch import nn

    from ctrserve.contract.feature_map import FeatureMap

#: static masks costing more test AUC than this deserve a look (issue 4)
AUC_BUDGET = 0.002


def calibration_sample(arrays: dict[str, np.ndarray], rows: int, seed: int) -> dict[str, np.ndarray]:
    """``rows`` training rows drawn without replacement with ``seed`` (all rows if fewer)."""
    n = len(next(iter(arrays.values())))
    if rows < 1:
        raise ValueError(f"calibration needs at least one row, got rows={rows}")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    return {k: v[idx] for k, v in arrays.items()}


def calibrate_model(model: nn.Module, sample: dict[str, np.ndarray], fmap: FeatureMap,
                    batch_size: int = 4096) -> dict[str, Any]:
    """Average A0 over ``sample``, install the static masks in ``model`` (in place) and return
    per-window calibration info, including how well the static masks agree with the
    per-sample (dynamic) masks they replace."""
    import torch  # the model's calibration methods run under no_grad

    from .train.batches import BatchIterator

    if not hasattr(model, "a0_scores") or not hasattr(model, "set_static_masks"):
        raise ValueError(f"model {type(model).__name__} has no deferred-interaction masks to calibrate")
    model.eval()
    sums: list[torch.Tensor] | None = None
    count = 0
    for batch, _ in BatchIterator(sample, fmap, batch_size):
        a0 = [a.double().sum(dim=0) for a in model.a0_scores(batch)]
        sums = a0 if sums is None else [s + a for s, a in zip(sums, a0, strict=True)]
        count += len(next(iter(batch.values())))
    if sums is None:
        raise ValueError("empty calibration sample")
    means = [s / count for s in sums]
    static = model.masks_from_a0(means)
    model.set_static_masks(static)

    # agreement: of the k_l pairs a sample's own A0 opens at layer l, how many the static mask opens
    hits = [torch.zeros(len(b.ks), dtype=torch.float64) for b in model.branches]
    for batch, _ in BatchIterator(sample, fmap, batch_size):
        for h, dyn in enumerate(model.dynamic_masks(batch)):
            hits[h] += (dyn * static[h]).flatten(-2).sum(dim=-1).double().sum(dim=0)
    windows = []
    for h, branch in enumerate(model.branches):
        m = branch.groups
        windows.append({
            "granularity": branch.granularity,
            "groups": m,
            "k": list(branch.ks),
            "mask_density": [k / (m * m) for k in branch.ks],
            "overlap_with_dynamic": [float(hits[h][i] / (count * k)) if k else 1.0 for i, k in enumerate(branch.ks)],
            "a0_mean": [[round(float(v), 6) for v in row] for row in means[h]],
            "masks": static[h].to(torch.int64).tolist(),
        })
    return {"rows": count, "windows": windows}


def static_variant(variant: str) -> str:
    """The results label of a calibrated run: ``static_masks`` for the default settings, else
    ``<variant>_static_masks`` (a tuned run's static masks are not the default's)."""
    return "static_masks" if variant == "default" else f"{variant}_static_masks"


def finetune_static(model: nn.Module, cfg: Any, fmap: FeatureMap, prepared: Path, epochs: int,
                    lr_scale: float = 0.1) -> dict[str, Any]:
    """Train the calibrated model on with its static masks in place, so the weights adapt to the
    masks they will be served with; keep the epoch best on valid, epoch 0 (no fine-tuning) included.
    Adam at ``lr_scale`` times the run's learning rate, the run's batch size and penalties."""
    import torch
    from torch import nn

    from ctrserve.contract.prepared import load_split

    from .train.batches import BatchIterator
    from .train.trainer import evaluate, train_step

    t = cfg.train
    train_arrays, valid = load_split(prepared, "train"), load_split(prepared, "valid")
    curve = [evaluate(model, valid, fmap, t.eval_batch_size)["auc"]]
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr * lr_scale, weight_decay=t.net_reg)
    loss_fn = nn.BCEWithLogitsLoss()
    batches = BatchIterator(train_arrays, fmap, t.batch_size, shuffle=True, seed=cfg.seed + 1)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch, labels in batches:
            train_step(model, optimizer, loss_fn, batch, labels, t.embedding_reg, t.micro_batches)
        curve.append(evaluate(model, valid, fmap, t.eval_batch_size)["auc"])
        if curve[-1] > curve[best_epoch]:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": epochs, "lr": t.lr * lr_scale, "valid_auc_by_epoch": curve, "chosen_epoch": best_epoch}


def calibrate_run(run_dir: Path, rows: int = 10_000, seed: int | None = None, command: str = "",
                  finetune_epochs: int = 0) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Calibrate the model of ``run_dir`` and write a static-mask run beside it; ``finetune_epochs``
    > 0 trains on with the static masks (``finetune_static``) before the static model is scored.

    Returns ``(new run dir, test metrics record, calibration info)``."""
    from ctrserve.contract.prepared import load_split

    from .train.trainer import count_params, evaluate, load_run, make_run_dir, predict, score_predictions, write_run

    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").exists() or not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (needs config.yaml and model.pt)")
    cfg, fmap, model = load_run(run_dir)
    if not hasattr(model, "set_static_masks"):
        raise ValueError(f"run {run_dir} holds model {cfg.model!r}, which has no masks to calibrate")
    prepared = Path((run_dir / "prepared_dir.txt").read_text().strip())
    seed = cfg.seed if seed is None else seed
    sample = calibration_sample(load_split(prepared, "train"), rows, seed)
    test, valid = load_split(prepared, "test"), load_split(prepared, "valid")

    dynamic = copy.deepcopy(model)
    dynamic.mask_mode = "dynamic"
    dynamic_probs = predict(dynamic, test, fmap, cfg.train.eval_batch_size)
    dynamic_test = score_predictions(dynamic_probs, test, fmap)
    dynamic_valid = evaluate(dynamic, valid, fmap, cfg.train.eval_batch_size)

    info = calibrate_model(model, sample, fmap, cfg.train.eval_batch_size)
    model.mask_mode = "static"
    if finetune_epochs:
        info["finetune"] = finetune_static(model, cfg, fmap, prepared, finetune_epochs)
    static_probs = predict(model, test, fmap, cfg.train.eval_batch_size)
    static_test = score_predictions(static_probs, test, fmap)
    static_valid = evaluate(model, valid, fmap, cfg.train.eval_batch_size)
    # how far single predictions move with the masks (docs/models/mgdin.md: why one run loses AUC)
    shift = np.abs(static_probs - dynamic_probs)
    shift_q = {"mean": float(shift.mean()), "p50": float(np.quantile(shift, 0.5)),
               "p99": float(np.quantile(shift, 0.99)), "max": float(shift.max())}
    # the serving choice is made on valid (test only reports): static unless it costs > the budget
    valid_delta = static_valid["auc"] - dynamic_valid["auc"]
    serving_mode = "static" if -valid_delta <= AUC_BUDGET else "dynamic"

    variant = static_variant(cfg.variant) + ("_finetuned" if finetune_epochs else "")
    new_cfg = cfg.model_copy(update={"variant": variant, "params": {**cfg.params, "mask_mode": "static"}})
    source = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else []
    delta = static_test["auc"] - dynamic_test["auc"]
    metrics = {
        "model": cfg.model, **cfg.dataset_record(), "variant": variant, "seed": cfg.seed, **static_test,
        "best_epoch": source.get("best_epoch", 0), "best_valid_auc": source.get("best_valid_auc", float("nan")),
        "params": count_params(model), "epoch_seconds": source.get("epoch_seconds", 0.0),
        "epochs": source.get("epochs", 0), "tokens": len(fmap.token_names()), "command": command,
        "notes": (f"static masks calibrated on {info['rows']} train rows (seed {seed}) from the weights of "
                  f"{run_dir.name}; dynamic-mask test AUC {dynamic_test['auc']:.4f} (delta {delta:+.4f}); "
                  f"valid delta {valid_delta:+.4f} -> serve {serving_mode} masks"
                  + (f"; fine-tuned with them, epoch {info['finetune']['chosen_epoch']} of {finetune_epochs} kept"
                     if finetune_epochs else "")),
    }
    new_dir = make_run_dir(run_dir.parents[2] if len(run_dir.parents) > 2 else run_dir.parent, new_cfg)
    write_run(new_dir, new_cfg, fmap, prepared, model, metrics, history)
    info.update({"seed": seed, "source_run": str(run_dir.resolve()), "dynamic_test": dynamic_test,
                 "static_test": static_test, "auc_delta_static_minus_dynamic": delta,
                 "dynamic_valid": dynamic_valid, "static_valid": static_valid,
                 "valid_auc_delta_static_minus_dynamic": valid_delta, "serving_mode": serving_mode,
                 "test_prediction_shift": shift_q})
    (new_dir / "calibration.json").write_text(json.dumps(info, indent=2))
    return new_dir, metrics, info


def calibrate_cmd(
    run: Annotated[Path, typer.Option(help="run directory of a trained MGDIN (dynamic masks)")],
    rows: Annotated[int, typer.Option(help="calibration rows sampled from the training split")] = 10_000,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: the run's seed)")] = None,
    record: Annotated[bool, typer.Option(help="record the static-mask test metrics in docs/results.json")] = False,
    finetune_epochs: Annotated[int, typer.Option(min=0, help="train on with the static masks, keeping the epoch "
                                                 "best on valid (0: the source run's weights)")] = 0,
) -> None:
    """Fix MGDIN's top-k masks from A0 averaged on training rows; write a static-mask run."""
    from rich.console import Console

    from .cli import invoked_command
    from .train.results import record_result, write_markdown

    console = Console()
    try:
        new_dir, metrics, info = calibrate_run(run, rows, seed, command=invoked_command(),
                                               finetune_epochs=finetune_epochs)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    for w in info["windows"]:
        console.print(f"window g={w['granularity']} (m={w['groups']}): k={w['k']} "
                      f"overlap with dynamic={[round(o, 3) for o in w['overlap_with_dynamic']]}")
    d, s = info["dynamic_test"], info["static_test"]
    console.print(f"test dynamic: AUC {d['auc']:.4f} GAUC {d['gauc']:.4f} LogLoss {d['logloss']:.4f}")
    console.print(f"test static:  AUC {s['auc']:.4f} GAUC {s['gauc']:.4f} LogLoss {s['logloss']:.4f} -> {new_dir}")
    q = info["test_prediction_shift"]
    console.print(f"test |p_static - p_dynamic|: mean {q['mean']:.4f}, p50 {q['p50']:.4f}, p99 {q['p99']:.4f}, "
                  f"max {q['max']:.4f}")
    if "finetune" in info:
        f = info["finetune"]
        console.print(f"fine-tuned with static masks at lr {f['lr']:g}: valid AUC by epoch "
                      f"{[round(a, 4) for a in f['valid_auc_by_epoch']]}, kept epoch {f['chosen_epoch']}")
    dv, sv = info["dynamic_valid"], info["static_valid"]
    console.print(f"valid dynamic AUC {dv['auc']:.4f}, static {sv['auc']:.4f} -> serve {info['serving_mode']} masks")
    if info["serving_mode"] == "dynamic":
        console.print(f"[yellow]static masks cost {-info['valid_auc_delta_static_minus_dynamic']:.4f} valid AUC "
                      f"(> {AUC_BUDGET}): export the source run instead (per-request masks): "
                      f"ctrserve export --run {run}[/]")
    if record:
        record_result(metrics)
        write_markdown()
