"""``ctrserve contest``: issue #24's fair contest on one dataset, as one resumable command.

Every model gets the same budget: ``tune`` (models/tune.py) to ``trials`` finished trials, with the
same settings held out of the search (``--set``, e.g. an epoch cap), all chosen on the validation
split, and the model's own settings trained once beside the trials (chosen when better on
validation). Then each seed trains at the chosen settings and is recorded as variant ``tuned``.
MGDIN also gets its w/o-DI ablation at its own tuned settings (``tuned_wo_di``) and static masks
calibrated from each tuned run and fine-tuned with them (``tuned_static_masks_finetuned``), the
serving form the verdict is about, and its DNN twin (``mgdin_twin``, recorded under ``dnn``): a DNN
with MGDIN's head and trainer settings over the same tokens, which is MGDIN without its attention
blocks when the tuned MGDIN feeds the raw tokens to its head (``head_embeddings``).

Each step first looks at what is already there (the study's finished trials, the records in
docs/results.json), so a contest stopped at any point resumes where it stopped, and ``plan`` lists
what is done and what is left. The verdict table and the tokens-vs-gain figure come from the
records (models/train/contest_report.py), regenerated after every recorded step.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from .train.contest_report import STATIC, SUBJECT, TUNED, TWIN, TWIN_MODEL, WO_DI

if TYPE_CHECKING:
    from .train.trainer import TrainResult

#: cheapest first, so a stopped contest has its baselines before the slow models
CONTEST_MODELS = ("dnn", "deepfm", "dcnv2", "autoint", "dlf", "mgdin")
#: per model: the ablations trained at its tuned settings (variant -> overrides)
ABLATIONS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {"mgdin": {WO_DI: {"model": {"deferred": False}}}}
#: models whose tuned runs are calibrated to static masks, then fine-tuned with them for up to this
#: many epochs (the epoch best on valid kept, none included): on Frappe seed 1 one epoch took the
#: static masks' valid AUC cost from 0.0045 to 0.0005 (docs/models/mgdin.md)
CALIBRATED = ("mgdin",)
FINETUNE_EPOCHS = 3
#: the settings MGDIN's twin takes from MGDIN's tuned config besides every trainer setting: the MLP
#: head and the tokens' width and sequence pooling
TWIN_KEYS = ("embedding_dim", "seq_pooling", "hidden", "dropout", "batch_norm")


@dataclass
class Step:
    kind: Literal["tune", "defaults", "train", "calibrate", "twin"]
    model: str
    variant: str = TUNED
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: bool = False

    def label(self) -> str:
        if self.kind in ("tune", "defaults"):
            return f"{self.kind} {self.model}"
        return f"{self.kind} {self.model} {self.variant} seed {self.seed}"


@dataclass
class Contest:
    """One dataset's contest: where it reads and writes, and its budget."""

    dataset: str
    data: dict[str, Any]
    trials: int
    fixed: dict[str, dict[str, Any]]
    seeds: list[int]
    models: list[str]
    out_root: Path  # docs/ and models/configs/tuned/ live under it
    work: Path  # prepared data, studies and runs

    @property
    def dataset_id(self) -> str:
        from .data.prepare import dataset_identity  # pandas: not at import (`ctrserve serve` images lack it)

        return dataset_identity(self.dataset, self.data)

    @property
    def results_json(self) -> Path:
        return self.out_root / "docs" / "results.json"

    def tuned_config(self, model: str) -> Path:
        from .tune import config_path  # optuna, torch: not at import

        return config_path(self.out_root, self.dataset_id, model)

    def tuning_record(self, model: str) -> dict[str, Any]:
        """The model's search record (empty before its study); refused when searched with other held
        settings or over another space."""
        from .tune import record_path, searched_space  # optuna, torch: not at import

        record = record_path(self.out_root, self.dataset_id, model)
        if not record.exists():
            return {}
        saved = json.loads(record.read_text())
        if (saved.get("fixed") or {}) != self.fixed:
            # one study, one budget: trials run with other held settings are not this contest's
            raise ValueError(f"{record} was searched with held settings {saved.get('fixed')}, not {self.fixed}; "
                             "pass the same --set, or remove the record and its study to start again")
        if saved.get("search_space") != searched_space(model, self.fixed):
            # models/configs/search.yaml changed since: those trials drew from another space
            raise ValueError(f"{record} was searched over another space than models/configs/search.yaml now "
                             f"gives {model}; remove the record, its study and its tuned runs to search again")
        return saved

    def _flags(self) -> str:
        return f"--dataset {self.dataset}{_options('--data-set', self.data)}"

    def tune_command(self, model: str) -> str:
        return f"ctrserve tune --model {model} {self._flags()} --trials {self.trials}{_options('--set', self.fixed)}"

    def step_config(self, step: Step) -> Path | None:
        """The config a training step reads: the model's tuned one; none for the twin, whose
        settings come as overrides (:meth:`twin_overrides`)."""
        return None if step.kind == "twin" else self.tuned_config(step.model)

    def train_command(self, step: Step) -> str:
        config = self.step_config(step)
        shown = "" if config is None else f" --config {config.relative_to(self.out_root)}"
        return (f"ctrserve train --model {step.model} {self._flags()}{shown} --seed {step.seed}"
                f"{_options('--set', step.overrides)} --variant {step.variant} --record")

    def twin_overrides(self) -> dict[str, dict[str, Any]]:
        """What MGDIN's twin sets over the DNN's own dataset config: the settings of MGDIN's tuned
        config that differ from it (``TWIN_KEYS`` and the trainer's)."""
        from .train.config import resolve_config

        subject = resolve_config(SUBJECT, self.dataset, self.tuned_config(SUBJECT), data=self.data)
        twin = resolve_config(TWIN_MODEL, self.dataset, data=self.data)
        train = {k: v for k, v in subject.train.model_dump().items() if getattr(twin.train, k) != v}
        head = {k: subject.params[k] for k in TWIN_KEYS
                if k in subject.params and twin.params.get(k) != subject.params[k]}
        return {block: values for block, values in (("train", train), ("model", head)) if values}


def _options(flag: str, blocks: dict[str, Any]) -> str:
    """``" --set train.max_epochs=5 ..."``: nested settings as the command line's options."""
    return "".join(f" {flag} {shlex.quote(f'{k}={v}')}" for k, v in _flat(blocks))


def _flat(blocks: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"train": {"max_epochs": 5}}`` -> ``[("train.max_epochs", 5)]`` (lists as JSON)."""
    out: list[tuple[str, Any]] = []
    for key, value in blocks.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", json.dumps(value) if isinstance(value, (list, bool)) else value))
    return out


def plan(contest: Contest) -> list[Step]:
    """Every step of the contest in order, each marked done from the study and the records."""
    from .train.results import load_results
    from .train.search_report import BUDGET_STATES, DEFAULTS  # the record format, without optuna or torch

    recorded = {(r["model"], r["variant"], r["seed"]) for r in load_results(contest.results_json)
                if r["dataset"] == contest.dataset_id}
    steps: list[Step] = []
    for model in contest.models:
        searched = contest.tuning_record(model)
        finished = sum(t["state"] in BUDGET_STATES for t in searched.get("trials", []))
        steps.append(Step("tune", model, done=finished >= contest.trials))
        steps.append(Step("defaults", model, done=DEFAULTS in searched))
        for variant, overrides in [(TUNED, {}), *ABLATIONS.get(model, {}).items()]:
            steps += [Step("train", model, variant, s, overrides, (model, variant, s) in recorded)
                      for s in contest.seeds]
        if model in CALIBRATED:
            steps += [Step("calibrate", model, STATIC, s, done=(model, STATIC, s) in recorded) for s in contest.seeds]
        if model == SUBJECT:
            steps += [Step("twin", TWIN_MODEL, TWIN, s, done=(TWIN_MODEL, TWIN, s) in recorded)
                      for s in contest.seeds]
    return steps


def run(contest: Contest, prepared: Path, say: Callable[[str], None] = print) -> list[Step]:
    """Run every step not yet done; returns the plan as it stands at the end."""
    from .train.results import record_result, write_markdown

    # planned again after every step: a defaults step that changes the choice drops the runs of the old one
    while (step := next((s for s in plan(contest) if not s.done), None)) is not None:
        say(f"contest {contest.dataset_id}: {step.label()}")
        if step.kind in ("tune", "defaults"):
            _tune(contest, prepared, step, say)
            continue
        if step.kind == "twin":  # its settings exist once the tuned model's search has chosen
            step.overrides = contest.twin_overrides()
        if step.kind in ("train", "twin"):
            metrics = _train(contest, prepared, step, record=True).metrics
        else:
            metrics = _calibrate(contest, prepared, step)
        record_result(metrics, contest.results_json)
        write_markdown(contest.results_json, contest.results_json.with_suffix(".md"))
    return plan(contest)


def _tune(contest: Contest, prepared: Path, step: Step, say: Callable[[str], None]) -> None:
    """The search and the defaults trial beside it (``tune``), or the defaults trial alone for a
    search recorded before it existed; records trained at an earlier choice are then dropped, so the
    plan trains them again."""
    from .train.results import drop_results
    from .tune import DEFAULTS, defaults_trial, tune

    model = step.model
    before = contest.tuning_record(model).get("best")
    if step.kind == "defaults":
        record = defaults_trial(model, contest.dataset, prepared, contest.work, 1, contest.data, contest.out_root)
    else:
        record = tune(model, contest.dataset, prepared, contest.work, contest.trials, seed=1, fixed=contest.fixed,
                      command=contest.tune_command(model), out_root=contest.out_root, data=contest.data)
    after = record["best"]
    if before is not None and before["number"] != after["number"]:
        variants = {TUNED, STATIC, *ABLATIONS.get(model, {})}
        twin = (TWIN_MODEL, TWIN) if model == SUBJECT else None
        gone = drop_results(lambda r: r["dataset"] == contest.dataset_id and (
            (r["model"] == model and r["variant"] in variants) or (r["model"], r["variant"]) == twin),
            contest.results_json)
        if not gone:  # a search resumed from its partial record: nothing was trained at its best so far
            return
        chosen = "its defaults" if after["number"] == DEFAULTS else f"trial {after['number']}"
        say(f"contest {contest.dataset_id}: {model} now uses {chosen} (valid AUC {after['valid_auc']:.4f}); "
            f"{len(gone)} runs at the earlier choice dropped, to train again")


def _train(contest: Contest, prepared: Path, step: Step, record: bool) -> TrainResult:
    from .train.config import resolve_config
    from .train.trainer import train

    cfg = resolve_config(step.model, contest.dataset, contest.step_config(step), step.overrides,
                         seed=step.seed, variant=step.variant, data=contest.data)
    command = contest.train_command(step) if record else ""
    return train(cfg, prepared, contest.work / "runs", command=command, progress=False)


def _calibrate(contest: Contest, prepared: Path, step: Step) -> dict[str, Any]:
    """Static masks from the seed's tuned run; a run folder lost with its machine is trained again
    (the seed reproduces it) without a second record."""
    from .calibrate import calibrate_run

    runs = contest.work / "runs" / contest.dataset_id / step.model
    found = sorted(p for p in runs.glob(f"{TUNED}-s{step.seed}-*") if (p / "model.pt").exists())
    source = found[-1] if found else _train(contest, prepared, Step("train", step.model, TUNED, step.seed),
                                            record=False).run_dir
    shown = source.relative_to(contest.out_root) if source.is_relative_to(contest.out_root) else source
    command = f"ctrserve calibrate --run {shown} --finetune-epochs {FINETUNE_EPOCHS} --record"
    _, metrics, _ = calibrate_run(source, finetune_epochs=FINETUNE_EPOCHS, command=command)
    return metrics


def contest_cmd(
    dataset: Annotated[str, typer.Option(help="dataset name")],
    trials: Annotated[int, typer.Option(min=1, help="finished tuning trials per model (the shared budget)")] = 12,
    seed: Annotated[list[int] | None, typer.Option(help="seeds of the recorded runs; repeat")] = None,
    model: Annotated[list[str] | None, typer.Option(help="contestants; repeat (default: all six)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="held out of the search for every model, "
                                                   "e.g. train.max_epochs=15")] = None,
    data_set: Annotated[list[str] | None, typer.Option("--data-set", help="dataset override, e.g. "
                                                       "semantic_ids.mode=replace")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the plan (done / to do) and stop")] = False,
) -> None:
    """The fair contest on one dataset: the same tuning budget for every model, then seeded runs at
    the tuned settings, MGDIN's w/o-DI ablation and static masks; resumes where it stopped."""
    from rich.console import Console

    from ctrserve.paths import REPO_ROOT, settings

    from .cli import ensure_prepared
    from .registry import list_models
    from .train.config import parse_set

    console = Console()
    models = model or list(CONTEST_MODELS)
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        console.print(f"[red]error:[/] unknown model(s) {unknown}; known: {', '.join(list_models())}")
        raise typer.Exit(2)
    try:
        fixed, data = parse_set(set_ or []), parse_set(data_set or [])
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    contest = Contest(dataset, data, trials, fixed, seed or [1, 2, 3], models, REPO_ROOT, settings().work_dir)
    try:
        steps = plan(contest) if dry_run else run(contest, ensure_prepared(dataset, data), console.print)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    for step in steps:
        console.print(f"{'done' if step.done else 'to do'}  {step.label()}")
