"""The searches table from hand-made records in a docs/tuning folder: running, finished, defaults won."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrserve.models.train import search_report
from ctrserve.models.train.results import load_results, markdown_for, write_markdown

pytestmark = pytest.mark.quick


def _record(root: Path, dataset: str, model: str, trials: list[tuple[str, float]], budget: int = 4,
            defaults: float | None = None, epochs: int = 15) -> None:
    record = {"model": model, "dataset": dataset, "fixed": {"train": {"max_epochs": epochs}},
              "command": f"ctrserve tune --model {model} --dataset {dataset} --trials {budget}",
              "trials": [{"number": i, "state": state, "valid_auc": auc} for i, (state, auc) in enumerate(trials)]}
    if defaults is not None:
        record["defaults"] = {"valid_auc": defaults}
    path = root / dataset / f"{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _table(root: Path) -> dict[tuple[str, str], str]:
    lines = search_report.markdown(search_report.load_searches(root))
    return {(cells[1], cells[2]): line for line in lines if line.startswith("| d") and not line.startswith("| dataset")
            for cells in [[c.strip() for c in line.split("|")]]}


def test_finished_running_and_defaults_won_searches(tmp_path: Path) -> None:
    _record(tmp_path, "d1", "dnn", [("COMPLETE", 0.80), ("PRUNED", 0.70), ("COMPLETE", 0.82), ("PRUNED", 0.6)],
            defaults=0.81)
    _record(tmp_path, "d1", "dcnv2", [("COMPLETE", 0.84), ("PRUNED", 0.7), ("COMPLETE", 0.83), ("COMPLETE", 0.8)],
            defaults=0.85)
    _record(tmp_path, "d2", "mgdin", [("COMPLETE", 0.80), ("RUNNING", None)])
    _record(tmp_path, "d2", "dnn", [("PRUNED", 0.5), ("RUNNING", None)])  # nothing finished: not listed
    rows = _table(tmp_path)
    assert set(rows) == {("d1", "dnn"), ("d1", "dcnv2"), ("d2", "mgdin")}
    assert rows[("d1", "dnn")].endswith("| 4 (2) | 2: 0.8200 | 0.8100 | trial 2 |")
    assert rows[("d1", "dcnv2")].endswith("| 4 (1) | 0: 0.8400 | 0.8500 | defaults |")
    assert rows[("d2", "mgdin")].endswith("| 1 (0) | 0: 0.8000 | – | searching |")
    (line,) = search_report.summary(search_report.load_searches(tmp_path))
    # the running search is not summed; trial 2 is not among the first two draws
    assert line.startswith("- 4 trials, train.max_epochs=15: 2 finished searches. In 1 of them")
    assert "stopped 3 of their 8 trials" in line and "defaults beat the search in 1 of 2." in line


def test_budgets_are_summed_apart_and_a_search_without_defaults_says_so(tmp_path: Path) -> None:
    _record(tmp_path, "d1", "dnn", [("COMPLETE", 0.8)] * 4, defaults=0.7)
    _record(tmp_path, "d2", "dnn", [("COMPLETE", 0.8)] * 2 + [("COMPLETE", 0.9)], budget=3, epochs=5)
    # as many searches under each budget: the larger budget first
    first, second = search_report.summary(search_report.load_searches(tmp_path))
    assert first.startswith("- 4 trials, train.max_epochs=15: 1 finished searches. In 1 of them")
    assert second.startswith("- 3 trials, train.max_epochs=5: 1 finished searches. In 0 of them")
    assert second.endswith("; no defaults trial.")
    assert _table(tmp_path)[("d2", "dnn")].endswith("| 2: 0.9000 | – | trial 2 |")


def test_a_record_without_a_budget_is_refused(tmp_path: Path) -> None:
    _record(tmp_path, "d1", "dnn", [("COMPLETE", 0.8)])
    path = tmp_path / "d1" / "dnn.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "command": "ctrserve tune --model dnn --dataset d1"}))
    with pytest.raises(ValueError, match="no --trials budget"):
        search_report.load_searches(tmp_path)


def test_results_markdown_lists_the_searches_beside_it(tmp_path: Path) -> None:
    _record(tmp_path / "tuning", "d1", "dnn", [("COMPLETE", 0.8)] * 4, defaults=0.7)
    js, md = tmp_path / "results.json", tmp_path / "results.md"
    js.write_text("[]")
    write_markdown(js, md)
    assert md.read_text() == markdown_for(load_results(js), md)
    assert "## Contest searches" in md.read_text() and "| d1 | dnn | train.max_epochs=15 | 4 (0) |" in md.read_text()
