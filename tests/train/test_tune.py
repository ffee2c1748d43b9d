"""``ctrserve tune``: one study on the tiny synthetic data — the record, the config it hands to
``train``, resuming, and a pruned trial that stops training."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from ctrserve.models.train.config import resolve_config
from ctrserve.models.tune import DEFAULTS, as_overrides, search_space, suggest, tune, write_choice

pytestmark = pytest.mark.slow

FIXED = {"train": {"max_epochs": 2, "batch_size": 512, "threads": 1}, "model": {"embedding_dim": 4, "hidden": [8]}}


def test_search_space_merges_base_and_model_blocks_and_names_bad_keys(tmp_path: Path) -> None:
    space = search_space("mgdin")
    assert {"train.lr", "train.embedding_reg", "model.head_embeddings", "model.windows"} <= set(space)
    assert "model.cross_layers" not in space
    bad = tmp_path / "search.yaml"
    bad.write_text("Base:\n  lr: {low: 1, high: 2}\n")
    with pytest.raises(ValueError, match="train.X or model.X"):
        search_space("dnn", bad)


def test_list_choices_come_back_as_lists() -> None:
    space = {"model.hidden": {"choice": [[8, 4], [16]]}, "train.lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    values = suggest(optuna.trial.FixedTrial({"model.hidden": "[16]", "train.lr": 2e-3}), space)
    assert values == {"model.hidden": [16], "train.lr": 2e-3}
    assert as_overrides(values) == {"train": {"lr": 2e-3}, "model": {"hidden": [16]}}


def test_a_study_records_every_trial_and_hands_its_best_to_train(tiny_prepared: Path, tmp_path: Path) -> None:
    record = tune("dnn", "synthetic", tiny_prepared, tmp_path / "work", trials=2, fixed=FIXED,
                  command="ctrserve tune --model dnn --dataset synthetic", out_root=tmp_path)
    saved = json.loads((tmp_path / "docs" / "tuning" / "synthetic" / "dnn.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert len(saved["trials"]) == 2 and all(t["state"] == "COMPLETE" for t in saved["trials"])
    aucs = [t["valid_auc"] for t in saved["trials"]]
    assert 0.5 < max(aucs) <= 1.0 and 0.5 < saved["defaults"]["valid_auc"] <= 1.0
    assert saved["best"]["valid_auc"] == max(*aucs, saved["defaults"]["valid_auc"])
    # the two trials sampled different settings
    assert saved["trials"][0]["params"] != saved["trials"][1]["params"]
    cfg_file = tmp_path / "models" / "configs" / "tuned" / "synthetic" / "dnn.yaml"
    cfg = resolve_config("dnn", "synthetic", config_file=cfg_file)
    best = saved["best"]["values"]
    # the chosen trial's values, or none at all when the defaults won
    assert (best == {}) == (saved["best"]["number"] == DEFAULTS)
    chosen = resolve_config("dnn", "synthetic", overrides=FIXED) if not best else None
    assert cfg.train.lr == pytest.approx(best["train.lr"] if best else chosen.train.lr)
    assert cfg.params["dropout"] == (best["model.dropout"] if best else chosen.params["dropout"])
    # settings held fixed are not searched, and travel with the chosen ones
    assert "model.hidden" not in saved["search_space"] and "model.hidden" not in best
    assert cfg.train.max_epochs == 2 and cfg.params["hidden"] == [8]
    assert "valid AUC" in cfg_file.read_text().splitlines()[0]
    # resuming with the same budget trains nothing more
    again = tune("dnn", "synthetic", tiny_prepared, tmp_path / "work", trials=2, fixed=FIXED, out_root=tmp_path)
    assert [t["valid_auc"] for t in again["trials"]] == aucs


def test_on_epoch_can_stop_a_run_before_it_writes(tiny_prepared: Path, tmp_path: Path) -> None:
    from ctrserve.models.train.trainer import train

    seen = []

    def stop(epoch: int, valid: dict[str, float]) -> None:
        seen.append((epoch, valid["auc"]))
        raise optuna.TrialPruned("enough")

    cfg = resolve_config("dnn", "synthetic", overrides=FIXED, seed=1)
    with pytest.raises(optuna.TrialPruned):
        train(cfg, tiny_prepared, tmp_path / "runs", progress=False, on_epoch=stop)
    assert len(seen) == 1 and seen[0][0] == 1
    assert not (tmp_path / "runs").exists()


def test_a_resumed_study_draws_new_settings_and_does_not_count_an_interrupted_trial(
        tiny_prepared: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    tune("dnn", "synthetic", tiny_prepared, work, trials=1, fixed=FIXED, out_root=tmp_path)
    # a trial stopped by Ctrl-C is stored as FAIL (Optuna catches KeyboardInterrupt that way)
    study = optuna.load_study(study_name="synthetic-dnn", storage=f"sqlite:///{work / 'tuning/synthetic/dnn.db'}")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    record = tune("dnn", "synthetic", tiny_prepared, work, trials=2, fixed=FIXED, out_root=tmp_path)
    assert [t["state"] for t in record["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    first, _, resumed = record["trials"]
    assert resumed["params"] != first["params"]


def test_the_defaults_are_chosen_only_when_they_beat_every_trial(tmp_path: Path) -> None:
    space = {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    record = {"model": "dnn", "dataset": "synthetic", "command": "ctrserve tune", "search_space": space,
              "fixed": FIXED, "trials": [
                  {"number": 0, "state": "COMPLETE", "valid_auc": 0.70, "params": {"train.lr": 2e-3}},
                  {"number": 1, "state": "PRUNED", "valid_auc": 0.90, "params": {"train.lr": 5e-3}},
                  {"number": 2, "state": "COMPLETE", "valid_auc": 0.75, "params": {"train.lr": 4e-3}}]}
    cfg_file = tmp_path / "models" / "configs" / "tuned" / "synthetic" / "dnn.yaml"
    # a pruned trial's value is its last epoch's, not a finished run's: it is never chosen
    chosen = write_choice({**record, DEFAULTS: {"valid_auc": 0.75}}, tmp_path)["best"]
    assert chosen == {"number": 2, "valid_auc": 0.75, "values": {"train.lr": 4e-3}}  # a tie keeps the trial
    assert resolve_config("dnn", "synthetic", config_file=cfg_file).train.lr == pytest.approx(4e-3)

    chosen = write_choice({**record, DEFAULTS: {"valid_auc": 0.80}}, tmp_path)["best"]
    assert chosen == {"number": DEFAULTS, "valid_auc": 0.80, "values": {}}
    cfg = resolve_config("dnn", "synthetic", config_file=cfg_file)
    assert cfg.train.lr == pytest.approx(resolve_config("dnn", "synthetic").train.lr)
    assert cfg.train.max_epochs == 2 and "the model's defaults" in cfg_file.read_text().splitlines()[0]


def test_a_search_stopped_with_its_machine_resumes_from_the_record(
        tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ctrserve.models import tune as tune_module

    trained = tune_module.train
    calls = []

    def stop_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine stops in the middle of trial 1
        return trained(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train", stop_at_second)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        tune("dnn", "synthetic", tiny_prepared, work, trials=3, fixed=FIXED, out_root=tmp_path)
    # trial 0 was written to the record as it finished, with its per-epoch values
    saved = json.loads((tmp_path / "docs" / "tuning" / "synthetic" / "dnn.json").read_text())
    assert [t["state"] for t in saved["trials"]] == ["COMPLETE"]
    assert sorted(saved["trials"][0]["epoch_valid_auc"]) == ["1", "2"]
    assert DEFAULTS not in saved

    monkeypatch.setattr(tune_module, "train", trained)
    shutil.rmtree(work)  # a fresh clone: the study's database is gone, the record is not
    record = tune("dnn", "synthetic", tiny_prepared, work, trials=3, fixed=FIXED, out_root=tmp_path)
    assert [t["state"] for t in record["trials"]] == ["COMPLETE"] * 3
    first = json.loads(json.dumps(record["trials"][0]))
    assert first == saved["trials"][0]  # kept as it was, not trained again
    assert len({json.dumps(t["params"], sort_keys=True) for t in record["trials"]}) == 3
    study = optuna.load_study(study_name="synthetic-dnn", storage=f"sqlite:///{work / 'tuning/synthetic/dnn.db'}")
    assert study.trials[0].intermediate_values == {int(k): v for k, v in first["epoch_valid_auc"].items()}


def test_a_record_of_another_search_or_other_held_settings_is_not_restored(
        tiny_prepared: Path, tmp_path: Path) -> None:
    from ctrserve.models.tune import record_path, restore

    tune("dnn", "synthetic", tiny_prepared, tmp_path / "work", trials=1, fixed=FIXED, out_root=tmp_path)
    record = record_path(tmp_path, "synthetic", "dnn")
    space = json.loads(record.read_text())["search_space"]
    other = {**FIXED, "train": {**FIXED["train"], "max_epochs": 1}}
    for searched, held in [(space, other), ({k: v for k, v in space.items() if k != "train.lr"}, FIXED)]:
        study = optuna.create_study(direction="maximize")
        restore(study, record, searched, held)
        assert study.trials == []
    study = optuna.create_study(direction="maximize")
    restore(study, record, space, FIXED)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
