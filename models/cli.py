"""Offline commands: ``data``, ``train``, ``eval``, ``results``, ``models``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
data_app = typer.Typer(help="Prepare datasets: vocabularies, normalisation, density statistics.", no_args_is_help=True)

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override, e.g. train.lr=3e-3 or model.embedding_dim=16")
]


def invoked_command() -> str:
    return "ctrserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _parse_data_overrides(items: list[str] | None) -> dict:
    from .train.config import parse_set

    return parse_set(items or [])


def _prepared_or_exit(dataset: str, items: list[str] | None, force: bool = False) -> tuple[dict, Path]:
    """The parsed data overrides and the prepared directory; a bad override, spec or missing file
    ends the command with its message (exit 2), not a traceback."""
    from .data.spec import SpecError

    try:
        data = _parse_data_overrides(items)
        return data, ensure_prepared(dataset, data, force=force)
    except (SpecError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def prepared_dir_for(dataset: str, overrides: dict | None = None) -> Path:
    from ctrserve.paths import settings

    from .data.prepare import dataset_identity

    return settings().processed_dir / dataset_identity(dataset, overrides)


def ensure_prepared(dataset: str, overrides: dict | None = None, force: bool = False) -> Path:
    """Prepare ``dataset`` unless a prepared copy exists; return its directory."""
    from ctrserve.paths import settings

    from .data.prepare import prepare

    out = prepared_dir_for(dataset, overrides)
    if force or not (out / "feature_map.json").exists():
        console.print(f"[bold]preparing[/] {dataset} -> {out}")
        prepare(dataset, settings().data_dir, out, overrides)
    return out


@data_app.command("prepare")
def data_prepare(
    dataset: Annotated[str, typer.Option(help="dataset name (models/data/specs) or spec path")],
    set_: SetOpt = None,
) -> None:
    """Build vocabularies, normalise numbers, measure information density, write splits."""
    _, out = _prepared_or_exit(dataset, set_, force=True)
    _print_density(out)


@data_app.command("rules")
def data_rules(
    dataset: Annotated[str, typer.Option(help="dataset name (models/data/specs) or spec path")],
    set_: SetOpt = None,
) -> None:
    """No-model history rules (matches between the history and the candidate): the AUC to beat;
    and the share of out-of-vocabulary candidates by label and split."""
    from .data.rules import candidate_oov, history_rules
    from .data.spec import SpecError

    try:
        prepared = ensure_prepared(dataset, _parse_data_overrides(set_))
        rows, oov = history_rules(prepared, ("train", "valid", "test"), se_rounds=200), candidate_oov(prepared)
    except (SpecError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    table = Table(title=f"{dataset}: no-model history rules")
    for col in ("split", "rule", "AUC", "AUC SE (users)", "GAUC", "positives matched", "negatives matched"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["split"]), str(r["rule"]), f"{r['auc']:.4f}", f"{r['auc_se']:.4f}", f"{r['gauc']:.4f}",
                      f"{r['pos_matched']:.3f}", f"{r['neg_matched']:.3f}")
    console.print(table)
    table = Table(title=f"{dataset}: out-of-vocabulary candidates")
    for col in ("split", "feature", "positives", "negatives"):
        table.add_column(col)
    for r in oov:
        table.add_row(str(r["split"]), str(r["feature"]), f"{r['positives']:.3f}", f"{r['negatives']:.3f}")
    console.print(table)


def _print_density(prepared: Path) -> None:
    from ctrserve.contract.feature_map import FeatureMap

    fmap = FeatureMap.load(prepared / "feature_map.json")
    table = Table(title=f"{fmap.dataset}: {fmap.num_rows}")
    for col in ("feature", "kind", "side", "vocab", "cardinality", "entropy", "coverage", "oov", "density"):
        table.add_column(col)
    for f in fmap.features:
        s = f.stats
        table.add_row(f.name, f.kind, f.side, str(f.vocab_size or "-"), str(s.cardinality) if s else "-",
                      f"{s.entropy_bits:.2f}" if s else "-", f"{s.coverage:.3f}" if s else "-",
                      f"{s.oov_rate:.4f}" if s else "-", f"{s.density:.2f}" if s else "-")
    console.print(table)
    console.print("density order: " + ", ".join(fmap.density_order()))
    if fmap.semantic_ids:
        sid = fmap.semantic_ids
        console.print(f"semantic IDs: {sid['levels']} levels x {sid['codebook']} codes; residual share after each "
                      f"level {sid['residual_share']}; warm items {sid['warm_items']}, cold {sid['cold_items']} "
                      f"({sid['cold_by_neighbour']} by content neighbour, {sid['cold_unknown']} unknown); "
                      f"full-code collisions {sid['collision_rate']:.1%}"
                      + (f"; item key {fmap.item_key.name} (not a model input)" if fmap.item_key else ""))


def train_cmd(
    model: Annotated[str, typer.Option(help="registered model name (ctrserve models)")],
    dataset: Annotated[str, typer.Option(help="dataset name")],
    config: Annotated[Path | None, typer.Option(help="YAML with train:/model: blocks")] = None,
    set_: SetOpt = None,
    seed: Annotated[list[int] | None, typer.Option(help="seed; repeat for several runs")] = None,
    variant: Annotated[str, typer.Option(help="label of this configuration in results")] = "default",
    data_set: Annotated[list[str] | None, typer.Option("--data-set", help="dataset override, e.g. n_rows=5000")] = None,
    record: Annotated[bool, typer.Option(help="append the test metrics to docs/results.json")] = False,
) -> None:
    """Train a model, evaluate it on the test split, write a run directory."""
    from ctrserve.paths import settings

    from .train import results
    from .train.config import parse_set, resolve_config
    from .train.trainer import train

    data, prepared = _prepared_or_exit(dataset, data_set)
    for s in seed or [2026]:
        try:
            cfg = resolve_config(model, dataset, config, parse_set(set_ or []), seed=s, variant=variant, data=data)
        except ValueError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        result = train(cfg, prepared, settings().runs_dir, command=invoked_command())
        m = result.metrics
        console.print(
            f"[bold green]{model}[/] on {cfg.dataset_id} seed {s}: test AUC {m['auc']:.4f} GAUC {m['gauc']:.4f} "
            f"LogLoss {m['logloss']:.4f} ({m['epochs']} epochs, {m['epoch_seconds']:.1f}s/epoch) -> {result.run_dir}"
        )
        if record:
            results.record_result(m, results.RESULTS_JSON)
    if record:
        results.write_markdown(results.RESULTS_JSON, results.RESULTS_MD)


def tune_cmd(
    model: Annotated[str, typer.Option(help="registered model name (ctrserve models)")],
    dataset: Annotated[str, typer.Option(help="dataset name")],
    trials: Annotated[int, typer.Option(min=1, help="finished trials to reach (a resumed study counts its own)")] = 20,
    seed: Annotated[int, typer.Option(help="sampler seed and training seed of every trial")] = 1,
    set_: SetOpt = None,
    data_set: Annotated[list[str] | None, typer.Option("--data-set", help="dataset override, e.g. n_rows=5000")] = None,
) -> None:
    """Search the model's settings on the validation split (Optuna, models/configs/search.yaml): the
    same budget for every model. Writes docs/tuning/<dataset>/<model>.json and a config for train."""
    from ctrserve.paths import settings

    from .train.config import parse_set
    from .tune import DEFAULTS, tune

    data, prepared = _prepared_or_exit(dataset, data_set)
    try:
        record = tune(model, dataset, prepared, settings().work_dir, trials, seed=seed,
                      fixed=parse_set(set_ or []), command=invoked_command(), data=data)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    best = record["best"]
    source = (f"its default settings, above the {len(record['trials'])} trials" if best["number"] == DEFAULTS
              else f"trial {best['number']} of {len(record['trials'])}")
    console.print(f"[bold green]{model}[/] on {dataset}: best valid AUC {best['valid_auc']:.4f} "
                  f"({source}): {best['values']}")


def eval_cmd(
    run: Annotated[Path, typer.Option(help="run directory written by ctrserve train")],
    split: Annotated[str, typer.Option(help="valid or test")] = "test",
    against_rules: Annotated[bool, typer.Option(help="also the paired AUC gap to the no-model rule best on "
                                                "valid, by bootstrap over users (sequence datasets)")] = False,
) -> None:
    """Re-evaluate a trained run on a prepared split."""
    from .train.trainer import load_run, predict, score_predictions

    if not (run / "model.pt").exists():
        console.print(f"[red]error:[/] {run} is not a run directory (no model.pt)")
        raise typer.Exit(2)
    cfg, fmap, model = load_run(run)
    from ctrserve.contract.prepared import load_split

    prepared = Path((run / "prepared_dir.txt").read_text().strip())
    arrays = load_split(prepared, split)
    probs = predict(model, arrays, fmap, cfg.train.eval_batch_size)
    console.print({"run": str(run), "split": split, **score_predictions(probs, arrays, fmap)})
    if against_rules:
        from .data.rules import gap_to_best_rule

        try:
            g = gap_to_best_rule(prepared, probs, split)
        except ValueError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        console.print(f"{split}: model AUC {g['model_auc']:.4f} − rule {g['rule']} (best on valid) "
                      f"{g['rule_auc']:.4f} = {g['gap']:+.4f}; paired over users: SE {g['se']:.4f}, "
                      f"95 % interval [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}], model ahead in "
                      f"{g['share_above']:.1%} of draws")


def results_cmd() -> None:
    """Regenerate docs/results.md from docs/results.json."""
    from .train.results import write_markdown

    console.print(f"wrote {write_markdown()}")


def models_cmd() -> None:
    """List registered models."""
    from .registry import list_models

    console.print(", ".join(list_models()))
