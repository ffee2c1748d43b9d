"""The contest verdict from hand-made records: which arm is served, and what the table says about it."""

from __future__ import annotations

import pytest

from ctrserve.models.train.contest_report import STATIC, TUNED, TWIN, WO_DI, markdown, plot, tick_labels, verdicts

pytestmark = pytest.mark.quick


def _rows(variants: dict[tuple[str, str], list[float]]) -> list[dict]:
    return [{"model": m, "variant": v, "dataset": "d", "seed": s, "auc": a, "tokens": 12}
            for (m, v), aucs in variants.items() for s, a in enumerate(aucs, 1)]


def test_calibrated_mgdin_is_judged_with_its_static_masks() -> None:
    rows = _rows({("dnn", TUNED): [0.80, 0.81, 0.82], ("dcnv2", TUNED): [0.70, 0.70, 0.70],
                  ("mgdin", TUNED): [0.83, 0.84, 0.85], ("mgdin", STATIC): [0.82, 0.83, 0.84],
                  ("mgdin", WO_DI): [0.80, 0.80, 0.80]})
    (v,) = verdicts(rows)
    assert v.best_baseline.model == "dnn" and v.mgdin.variant == STATIC
    assert v.over_baseline.value == pytest.approx(0.02) and v.over_baseline.beyond_noise
    assert v.over_wo_di is not None and v.over_wo_di.value == pytest.approx(0.04)  # dynamic against w/o DI
    assert v.static_minus_dynamic == pytest.approx(-0.01)
    row = next(line for line in markdown(rows) if line.startswith("| d |"))
    assert "(3 seeds)" in row and "-0.0100 (over 0.002)" in row


def test_uncalibrated_mgdin_is_shown_as_dynamic_without_a_static_gap() -> None:
    rows = _rows({("dnn", TUNED): [0.80, 0.81], ("mgdin", TUNED): [0.79, 0.80]})
    (v,) = verdicts(rows)
    assert v.static is None and v.mgdin.variant == TUNED and v.static_minus_dynamic is None
    row = next(line for line in markdown(rows) if line.startswith("| d |"))
    assert "dynamic: not calibrated yet" in row and row.rstrip().endswith("| – | – |")


def test_a_baseline_still_seeding_says_how_many_seeds_it_has() -> None:
    rows = _rows({("dlf", TUNED): [0.90], ("mgdin", TUNED): [0.79, 0.80, 0.81]})
    row = next(line for line in markdown(rows) if line.startswith("| d |"))
    assert "dlf 0.9000 (1 seed) |" in row and "(3 seeds, dynamic" in row


def test_a_gap_to_a_one_seed_arm_is_never_called_beyond_noise() -> None:
    rows = _rows({("dlf", TUNED): [0.90], ("mgdin", TUNED): [0.79, 0.80, 0.81]})
    (v,) = verdicts(rows)
    assert v.over_baseline.value == pytest.approx(-0.10) and not v.over_baseline.beyond_noise
    row = next(line for line in markdown(rows) if line.startswith("| d |"))
    assert "| -0.1000 (one seed: noise unknown) |" in row


def test_no_verdict_without_a_tuned_baseline() -> None:
    assert verdicts(_rows({("mgdin", TUNED): [0.8]})) == [] and markdown([]) == []


def test_the_twin_is_compared_with_dynamic_mgdin_and_is_never_the_best_baseline() -> None:
    rows = _rows({("dnn", TUNED): [0.80, 0.80, 0.80], ("dnn", TWIN): [0.90, 0.91, 0.92],
                  ("mgdin", TUNED): [0.85, 0.86, 0.87], ("mgdin", STATIC): [0.85, 0.86, 0.87]})
    (v,) = verdicts(rows)
    assert v.best_baseline.variant == TUNED and v.best_baseline.mean == pytest.approx(0.80)
    assert v.over_twin is not None and v.over_twin.value == pytest.approx(-0.05) and v.over_twin.beyond_noise
    row = next(line for line in markdown(rows) if line.startswith("| d |"))
    assert "| -0.0500 ± 0.0082 |" in row


def test_the_figure_names_each_dataset_at_its_token_count(tmp_path) -> None:
    rows = [{**r, "dataset": name, "tokens": tokens}
            for name, tokens in (("frappe", 10), ("frappe_meta-semantic_ids.modeadd", 22))
            for r in _rows({("dnn", TUNED): [0.80, 0.81], ("mgdin", TUNED): [0.79, 0.80]})]
    assert tick_labels(verdicts(rows)) == {10: "10\nfrappe\n(dynamic)",
                                           22: "22\nfrappe_meta\nsemantic_ids.modeadd\n(dynamic)"}
    out = plot(rows, tmp_path / "gain.png")
    assert out is not None and out.read_bytes().startswith(b"\x89PNG")
    assert plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
