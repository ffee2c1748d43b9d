"""``ctrserve tune``: one search budget for every model, chosen on the validation split (Optuna).

A fair contest gives each model the same number of trials from the same search procedure: a TPE
sampler with a fixed seed over the space in ``models/configs/search.yaml`` (a ``Base`` block shared
by every model plus the model's own block), and a median pruner on the per-epoch validation AUC.
Each trial trains with the model's dataset defaults plus the sampled values; the objective is the
best validation AUC (the test split is never looked at). Written:

- ``docs/tuning/<dataset>/<model>.json``: the command, the search space and every trial (values,
  validation AUC, epochs, state): the record of the search;
- ``models/configs/tuned/<dataset>/<model>.yaml``: the best values as a ``Base`` block, used with
  ``ctrserve train --config`` for the seeded runs.

Beside the budget, the model's own settings train once like a trial and are chosen when they beat
every trial on validation (``defaults`` in the record), so tuning never returns a worse setting.

The study lives in ``work/tuning/<dataset>/<model>.db`` (SQLite), so an interrupted search resumes.
The record is rewritten after every finished trial with each trial's per-epoch validation AUC, so a
study lost with its machine (a fresh clone has no ``work/``) is rebuilt from the record and resumes
there too: only the trial that was running is trained again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from .data.prepare import dataset_identity
from .train.config import resolve_config
from .train.search_report import BUDGET_STATES, DEFAULTS
from .train.trainer import train

SEARCH_FILE = Path(__file__).resolve().parent / "configs" / "search.yaml"
REPO = Path(__file__).resolve().parents[1]


def search_space(model: str, path: Path = SEARCH_FILE) -> dict[str, dict[str, Any]]:
    """The Base block merged with the model's block: ``"train.lr" -> {low, high, log} | {choice}``."""
    doc = yaml.safe_load(path.read_text()) or {}
    space = {**(doc.get("Base") or {}), **(doc.get(model) or {})}
    for key, spec in space.items():
        if key.split(".", 1)[0] not in ("train", "model") or "." not in key:
            raise ValueError(f"{path}: search key {key!r} must be train.X or model.X")
        if "choice" not in spec and not {"low", "high"} <= set(spec):
            raise ValueError(f"{path}: {key!r} needs `choice` or `low` and `high`")
    return space


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, BaseDistribution]:
    """The Optuna distribution each key is drawn from; list-valued choices travel as their JSON
    text (Optuna stores scalars)."""
    out: dict[str, BaseDistribution] = {}
    for key, spec in space.items():
        if "choice" in spec:
            out[key] = CategoricalDistribution([json.dumps(c) if isinstance(c, list) else c for c in spec["choice"]])
        else:
            out[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return out


def searched_space(model: str, fixed: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The model's search space less the settings ``fixed`` holds out of it."""
    held = {f"{block}.{name}" for block, settings in (fixed or {}).items() for name in settings}
    return {key: spec for key, spec in search_space(model).items() if key not in held}


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per key, list-valued choices back as lists."""
    values: dict[str, Any] = {}
    for key, dist in distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            picked = trial.suggest_categorical(key, dist.choices)
            values[key] = json.loads(picked) if isinstance(picked, str) and picked.startswith("[") else picked
        else:
            values[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
    return values


def as_overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train.lr": 1e-3, "model.x": 2}`` -> ``{"train": {"lr": 1e-3}, "model": {"x": 2}}``."""
    out: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for key, value in values.items():
        block, name = key.split(".", 1)
        out[block][name] = value
    return out


def with_fixed(overrides: dict[str, dict[str, Any]], fixed: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``overrides`` with the settings held out of the search laid over them, block by block."""
    held = {block: {**overrides.get(block, {}), **settings} for block, settings in (fixed or {}).items()}
    return {**overrides, **held}


def objective(model: str, dataset: str, prepared: Path, runs_dir: Path, space: dict[str, dict[str, Any]],
              seed: int, fixed: dict[str, Any] | None = None, data: dict[str, Any] | None = None
              ) -> Callable[[optuna.Trial], float]:
    def run(trial: optuna.Trial) -> float:
        values = suggest(trial, space)
        overrides = with_fixed(as_overrides(values), fixed)
        cfg = resolve_config(model, dataset, overrides=overrides, seed=seed, variant=f"tune-{trial.number}", data=data)

        def report(epoch: int, valid: dict[str, float]) -> None:
            trial.report(valid["auc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid AUC {valid['auc']:.4f} at epoch {epoch}")

        result = train(cfg, prepared, runs_dir, progress=False, on_epoch=report)
        trial.set_user_attr("epochs", result.metrics["epochs"])
        trial.set_user_attr("best_epoch", result.metrics["best_epoch"])
        return float(result.metrics["best_valid_auc"])

    return run


def tune(model: str, dataset: str, prepared: Path, work: Path, trials: int, seed: int = 1,
         fixed: dict[str, Any] | None = None, command: str = "", out_root: Path = REPO,
         data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the study up to ``trials`` finished trials; write the record and the config.
    ``fixed`` (``{"train": {...}, "model": {...}}``) holds settings out of the search for every trial;
    ``data`` (loader overrides) names the study, its record and its config like the prepared data."""
    space = searched_space(model, fixed)
    name = dataset_identity(dataset, data)
    db = work / "tuning" / name / f"{model}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=f"{name}-{model}", storage=f"sqlite:///{db}", load_if_exists=True, direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    )
    restore(study, record_path(out_root, name, model), space, fixed)
    # A fresh sampler seeded with `seed` alone would replay the first trials' settings after a
    # resume (its start-up draws restart); offsetting by the trials already stored keeps a fresh
    # study exactly as before and gives a resumed one new settings.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = [t for t in study.trials if t.state.name in BUDGET_STATES]
    if len(done) < trials:
        def save(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
            if any(t.state.name == "COMPLETE" for t in study.trials):
                write_record(study, model, name, space, fixed, command, out_root)

        study.optimize(objective(model, dataset, prepared, db.parent / "runs", space, seed, fixed, data),
                       n_trials=trials - len(done), callbacks=[save])
    # the trials' record is written before the defaults train: a search stopped there keeps its record
    record = write_record(study, model, name, space, fixed, command, out_root)
    return _with_defaults(record, dataset, prepared, work, seed, data, out_root)


def restore(study: optuna.Study, record: Path, space: dict[str, dict[str, Any]], fixed: dict[str, Any] | None
            ) -> None:
    """An empty study takes the finished trials of its record, when the record was searched over
    the same space with the same held settings: a search resumes on another machine from what
    the repository keeps. The per-epoch values come back too, so the pruner judges as before."""
    if study.trials or not record.exists():
        return
    saved = json.loads(record.read_text())
    if saved.get("search_space") != space or (saved.get("fixed") or {}) != (fixed or {}):
        return
    dists = distributions(space)
    for t in saved.get("trials", []):
        if t["state"] not in (*BUDGET_STATES, "FAIL"):
            continue  # the trial running when the machine stopped trains again
        steps = {int(step): auc for step, auc in (t.get("epoch_valid_auc") or {}).items()}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[t["state"]], value=t["valid_auc"],
            params=t["params"], distributions={k: dists[k] for k in t["params"]}, intermediate_values=steps,
            user_attrs={"epochs": t["epochs"]} if t.get("epochs") is not None else {}))


def record_path(out_root: Path, dataset_id: str, model: str) -> Path:
    return out_root / "docs" / "tuning" / dataset_id / f"{model}.json"


def config_path(out_root: Path, dataset_id: str, model: str) -> Path:
    """The chosen settings as a config for ``ctrserve train --config``."""
    return out_root / "models" / "configs" / "tuned" / dataset_id / f"{model}.yaml"


def write_record(study: optuna.Study, model: str, dataset: str, space: dict[str, Any], fixed: dict[str, Any] | None,
                 command: str, out_root: Path) -> dict[str, Any]:
    """The search's record and its choice; a defaults trial already in the record is kept."""
    trials = [{"number": t.number, "state": t.state.name, "valid_auc": t.value, "params": t.params,
               "epochs": t.user_attrs.get("epochs"), "epoch_valid_auc": t.intermediate_values}
              for t in study.trials]
    if not any(t["state"] == "COMPLETE" for t in trials):
        raise RuntimeError(f"{dataset}/{model}: no trial finished")
    record = {"model": model, "dataset": dataset, "command": command, "search_space": space, "fixed": fixed or {},
              "trials": trials}
    out = record_path(out_root, dataset, model)
    earlier = json.loads(out.read_text()) if out.exists() else {}
    if DEFAULTS in earlier and (earlier.get("fixed") or {}) == record["fixed"]:
        record[DEFAULTS] = earlier[DEFAULTS]
    return write_choice(record, out_root)


def defaults_trial(model: str, dataset: str, prepared: Path, work: Path, seed: int = 1,
                   data: dict[str, Any] | None = None, out_root: Path = REPO) -> dict[str, Any]:
    """The model's own settings (its config with the search's held settings over them), trained like
    a trial (same seed, no pruning) beside the search, and chosen when better on validation: a search
    must not hand back a setting worse than the one the model ships with. On amazon_sports the 12
    trials' best DeepFM setting was 0.0023 valid AUC below its defaults (docs/decisions.md)."""
    record = json.loads(record_path(out_root, dataset_identity(dataset, data), model).read_text())
    return _with_defaults(record, dataset, prepared, work, seed, data, out_root)


def _with_defaults(record: dict[str, Any], dataset: str, prepared: Path, work: Path, seed: int,
                   data: dict[str, Any] | None, out_root: Path) -> dict[str, Any]:
    """``record`` with its defaults trial, and the choice written; a record that has the trial was
    written with it, and comes back as it is."""
    if DEFAULTS in record:
        return record
    model, name = record["model"], record["dataset"]
    cfg = resolve_config(model, dataset, overrides=with_fixed({}, record["fixed"]), seed=seed,
                         variant="tune-defaults", data=data)
    metrics = train(cfg, prepared, work / "tuning" / name / "runs", progress=False).metrics
    record[DEFAULTS] = {"valid_auc": float(metrics["best_valid_auc"]), "epochs": metrics["epochs"],
                        "best_epoch": metrics["best_epoch"]}
    return write_choice(record, out_root)


def write_choice(record: dict[str, Any], out_root: Path) -> dict[str, Any]:
    """Pick the best finished trial, or the defaults when they beat it; write the record and the
    config ``ctrserve train --config`` reads."""
    model, dataset, fixed = record["model"], record["dataset"], record["fixed"]
    best = max((t for t in record["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["valid_auc"])
    values = suggest(optuna.trial.FixedTrial(best["params"]), record["search_space"])
    record["best"] = {"number": best["number"], "valid_auc": best["valid_auc"], "values": values}
    chosen = f"trial {best['number']} of {len(record['trials'])}: valid AUC {best['valid_auc']:.4f}"
    defaults = record.get(DEFAULTS)
    if defaults is not None and defaults["valid_auc"] > best["valid_auc"]:
        record["best"] = {"number": DEFAULTS, "valid_auc": defaults["valid_auc"], "values": {}}
        chosen = (f"the model's defaults: valid AUC {defaults['valid_auc']:.4f}, above the best of "
                  f"{len(record['trials'])} trials, {chosen}")
    out = record_path(out_root, dataset, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    cfg = config_path(out_root, dataset, model)
    cfg.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Chosen by `{record['command']}` ({chosen});\n"
              f"# every trial: docs/tuning/{dataset}/{model}.json. "
              f"Use: ctrserve train --config {cfg.relative_to(out_root)}\n")
    overrides = with_fixed(as_overrides(record["best"]["values"]), fixed)
    cfg.write_text(header + yaml.safe_dump({"Base": overrides}, sort_keys=True))
    return record
