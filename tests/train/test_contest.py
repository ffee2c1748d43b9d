"""``ctrserve contest`` on the tiny synthetic data: every step recorded once, a second call trains
nothing, a lost run folder is retrained (same seed, same AUC) for its static masks, a changed
budget is refused, and the verdict table and figure come from the records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ctrserve.models import contest as contest_mod
from ctrserve.models.contest import Contest, plan, run
from ctrserve.models.train.contest_report import STATIC, TUNED, TWIN, WO_DI, verdicts
from ctrserve.models.train.results import load_results

pytestmark = pytest.mark.slow

HELD = {"train": {"max_epochs": 1, "batch_size": 512, "threads": 1}, "model": {"embedding_dim": 4, "hidden": [8]}}


def make_contest(tmp_path: Path, fixed: dict = HELD) -> Contest:
    return Contest("synthetic", {}, trials=1, fixed=fixed, seeds=[1], models=["dnn", "mgdin"],
                   out_root=tmp_path, work=tmp_path / "work")


def test_a_contest_records_each_step_once_and_resumes(tiny_prepared: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    contest = make_contest(tmp_path)
    before = plan(contest)
    assert [s.label() for s in before] == [
        "tune dnn", "defaults dnn", "train dnn tuned seed 1",
        "tune mgdin", "defaults mgdin", "train mgdin tuned seed 1", "train mgdin tuned_wo_di seed 1",
        "calibrate mgdin tuned_static_masks_finetuned seed 1", "twin dnn mgdin_twin seed 1"]
    assert not any(s.done for s in before)

    after = run(contest, tiny_prepared, say=lambda _: None)
    assert all(s.done for s in after)
    rows = load_results(contest.results_json)
    assert sorted((r["model"], r["variant"]) for r in rows) == [
        ("dnn", TWIN), ("dnn", TUNED), ("mgdin", TUNED), ("mgdin", STATIC), ("mgdin", WO_DI)]
    fmap = json.loads((tiny_prepared / "feature_map.json").read_text())
    assert all(r["tokens"] > 1 and r["dataset"] == "synthetic" for r in rows)
    wo_di = next(r for r in rows if r["variant"] == WO_DI)
    assert "--variant tuned_wo_di" in wo_di["command"] and "--set model.deferred=false" in wo_di["command"]
    assert "--config models/configs/tuned/synthetic/mgdin.yaml" in wo_di["command"]
    assert fmap["dataset"] == "synthetic"
    # the twin: a DNN with MGDIN's head and trainer settings over its own dataset config
    twin = next(r for r in rows if r["variant"] == TWIN)
    assert "--config" not in twin["command"] and "--model dnn" in twin["command"]
    mgdin = next(r for r in rows if (r["model"], r["variant"]) == ("mgdin", TUNED))
    assert twin["params"] < mgdin["params"]  # the blocks are what it lacks
    overrides = contest.twin_overrides()
    assert overrides["model"]["hidden"] == [8] and overrides["model"]["embedding_dim"] == 4
    assert overrides["train"]["max_epochs"] == 1 and "--set 'model.hidden=[8]'" in twin["command"]

    # the verdict and the figure come from those records
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "## MGDIN contest" in md and "| synthetic |" in md
    assert (tmp_path / "docs" / "img" / "mgdin_tokens_gain.png").stat().st_size > 0
    (v,) = verdicts(rows)
    assert v.best_baseline.model == "dnn" and v.mgdin.variant == STATIC and v.wo_di is not None
    assert v.twin is not None and v.best_baseline.variant == TUNED

    # a second call finds everything done and trains nothing
    def refuse(*args, **kwargs):
        raise AssertionError("a finished contest trained again")

    monkeypatch.setattr(contest_mod, "_train", refuse)
    monkeypatch.setattr(contest_mod, "_tune", refuse)
    run(contest, tiny_prepared, say=lambda _: None)
    assert load_results(contest.results_json) == rows


def test_static_masks_of_a_lost_run_are_calibrated_from_a_retrained_seed(tiny_prepared: Path,
                                                                         tmp_path: Path) -> None:
    contest = make_contest(tmp_path)
    contest.models = ["mgdin"]
    run(contest, tiny_prepared, say=lambda _: None)
    static = next(r for r in load_results(contest.results_json) if r["variant"] == STATIC)
    # a new machine: the run folders are gone, and so is the static record
    shutil.rmtree(contest.work / "runs")
    kept = [r for r in load_results(contest.results_json) if r["variant"] != STATIC]
    contest.results_json.write_text(json.dumps(kept))
    assert [s.label() for s in plan(contest) if not s.done] == ["calibrate mgdin tuned_static_masks_finetuned seed 1"]
    run(contest, tiny_prepared, say=lambda _: None)
    again = next(r for r in load_results(contest.results_json) if r["variant"] == STATIC)
    assert again["auc"] == pytest.approx(static["auc"], abs=1e-4)
    # the retrained seed was not recorded a second time
    assert sum(r["variant"] == TUNED for r in load_results(contest.results_json)) == 1


def test_a_contest_tuned_without_the_defaults_trial_gets_it_and_retrains_when_the_choice_changes(
        tiny_prepared: Path, tmp_path: Path) -> None:
    contest = make_contest(tmp_path)
    contest.models = ["dnn"]
    run(contest, tiny_prepared, say=lambda _: None)
    (first,) = load_results(contest.results_json)
    # a record from before the defaults trial existed, whose search found nothing good
    path = tmp_path / "docs" / "tuning" / "synthetic" / "dnn.json"
    record = json.loads(path.read_text())
    del record["defaults"]
    record["trials"][0]["valid_auc"] = record["best"]["valid_auc"] = 0.1
    record["best"]["number"] = 0
    path.write_text(json.dumps(record))
    assert [s.label() for s in plan(contest) if not s.done] == ["defaults dnn"]
    said: list[str] = []
    after = run(contest, tiny_prepared, say=said.append)
    assert all(s.done for s in after) and any("1 runs at the earlier choice dropped" in m for m in said)
    assert json.loads(path.read_text())["best"]["number"] == "defaults"
    (again,) = load_results(contest.results_json)
    assert again["variant"] == TUNED and again["auc"] != first["auc"]  # trained again, at the defaults


def test_a_study_searched_with_other_held_settings_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    contest = make_contest(tmp_path)
    contest.models = ["dnn"]
    run(contest, tiny_prepared, say=lambda _: None)
    other = make_contest(tmp_path, {**HELD, "train": {**HELD["train"], "max_epochs": 2}})
    other.models = ["dnn"]
    with pytest.raises(ValueError, match="held settings"):
        plan(other)


def test_the_command_lists_the_plan_and_names_a_bad_model() -> None:
    from typer.testing import CliRunner

    from ctrserve.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["contest", "--dataset", "synthetic", "--dry-run"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "to do  tune dnn" in out.output and "calibrate mgdin tuned_static_masks_finetuned seed 3" in out.output
    out = runner.invoke(app, ["contest", "--dataset", "synthetic", "--model", "nope", "--dry-run"])
    assert out.exit_code == 2 and "unknown model" in out.output


def test_a_study_searched_over_another_space_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    contest = make_contest(tmp_path)
    contest.models = ["dnn"]
    run(contest, tiny_prepared, say=lambda _: None)
    path = tmp_path / "docs" / "tuning" / "synthetic" / "dnn.json"
    record = json.loads(path.read_text())
    record["search_space"]["model.dropout"] = {"choice": [0.0, 0.5]}  # search.yaml has changed since
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="another space"):
        plan(contest)
