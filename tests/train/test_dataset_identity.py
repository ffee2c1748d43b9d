"""Results name their data: runs of one dataset prepared with different loader overrides carry
the prepared folder's name (``synthetic-n_rows1500-…``) in metrics.json, the run folder, the plot
title and the results records, and ``ctrserve results`` keeps them in separate sections. Records
without overrides still read as the plain dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctrserve.models.data.prepare import dataset_identity
from ctrserve.models.train import results

pytestmark = pytest.mark.quick

SMALL = ["n_users=80", "n_items=40", "n_cates=5", "max_len=6"]


def test_identity_is_the_prepared_folder_name() -> None:
    assert dataset_identity("amazon_sports") == "amazon_sports"
    assert dataset_identity("amazon_sports", {"path": "amazon_beauty", "category": "Beauty"}) == \
        "amazon_sports-categoryBeauty-pathamazon_beauty"
    assert dataset_identity("specs/my.yaml", {"path": "/data/x"}) == "my-path_data_x"  # no nested folders
    nested = {"semantic_ids": {"levels": 3}, "max_len": 9}  # --data-set semantic_ids.levels=3
    assert dataset_identity("frappe", nested) == "frappe-max_len9-semantic_ids.levels3"


def test_two_override_sets_are_two_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrserve.cli import app

    monkeypatch.setenv("CTRSERVE_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(results, "RESULTS_JSON", tmp_path / "results.json")
    monkeypatch.setattr(results, "RESULTS_MD", tmp_path / "results.md")
    titles: list[str] = []
    monkeypatch.setattr("ctrserve.models.train.plots.plot_curve", lambda _h, _p, title="": titles.append(title))
    runner = CliRunner()
    ids = []
    for n_rows in (1500, 1200):
        data = [f"n_rows={n_rows}", *SMALL]
        args = ["train", "--model", "lr", "--dataset", "synthetic", "--set", "train.max_epochs=1", "--record"]
        for item in data:
            args += ["--data-set", item]
        out = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert out.exit_code == 0, out.output
        ids.append(dataset_identity("synthetic", dict(i.split("=") for i in data)))
        assert ids[-1] in out.output
    assert ids[0] != ids[1] and all(i.startswith("synthetic-") for i in ids)

    processed = tmp_path / "work" / "processed"
    assert sorted(p.name for p in processed.iterdir()) == sorted(ids)  # the prepared folders: the same names
    runs = tmp_path / "work" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(ids)
    for dataset_id, title in zip(ids, titles, strict=True):
        (run,) = (runs / dataset_id / "lr").iterdir()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["dataset"] == dataset_id and metrics["data_overrides"]["n_rows"] in (1500, 1200)
        assert title == f"lr on {dataset_id} (seed 2026)"

    rows = results.load_results(tmp_path / "results.json")
    assert sorted(r["dataset"] for r in rows) == sorted(ids)  # one record each: the second did not replace the first
    md = (tmp_path / "results.md").read_text()
    for dataset_id in ids:
        section = md.split(f"## {dataset_id}\n", 1)[1].split("\n## ", 1)[0]
        assert section.count("| lr | default | 1 |") == 1
    assert "Loader overrides: " in md and "`n_rows=1200`" in md


def test_old_records_without_overrides_read_as_the_plain_dataset() -> None:
    old = {"model": "dnn", "dataset": "frappe", "variant": "default", "seed": 1, "auc": 0.9, "gauc": 0.8,
           "logloss": 0.3, "params": 10, "epoch_seconds": 1.0, "command": "ctrserve train ..."}
    md = results.render_markdown([old])
    assert "## frappe\n\n| model |" in md and "Loader overrides" not in md


def test_eval_against_rules_prints_the_paired_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrserve.cli import app

    monkeypatch.setenv("CTRSERVE_WORK_DIR", str(tmp_path / "work"))
    runner = CliRunner()
    args = ["train", "--model", "lr", "--dataset", "synthetic", "--set", "train.max_epochs=1"]
    for item in ["n_rows=1500", *SMALL]:
        args += ["--data-set", item]
    assert runner.invoke(app, args).exit_code == 0
    (run,) = (tmp_path / "work" / "runs").glob("*/lr/*")
    out = runner.invoke(app, ["eval", "--run", str(run), "--against-rules"], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert "(best on valid)" in out.output and "paired over users" in out.output and "95 % interval" in out.output


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_bad_data_override_is_a_message_not_a_traceback(command: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrserve.cli import app

    monkeypatch.setenv("CTRSERVE_WORK_DIR", str(tmp_path / "work"))
    args = [command, "--model", "lr", "--dataset", "synthetic", "--data-set", "semantic_ids.mode=sometimes"]
    out = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "semantic_ids.mode" in out.output and "Traceback" not in out.output, out.output
