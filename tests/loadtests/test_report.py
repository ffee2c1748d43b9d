"""Rendering docs/benchmarks.md from docs/benchmarks.json."""

from __future__ import annotations

import json

import pytest

from ctrserve.loadtests import report

pytestmark = pytest.mark.quick


def test_sections_merge_and_render_without_clobbering(tmp_path) -> None:
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    machine = {"cores": 2, "load_avg_1m": 7.0}
    report.record_section("store", "Store", "ctrserve bench store", {"store_fetch_p50_ms": (0.3, "fetch p50")},
                          machine=machine, path=js)
    report.write_markdown("store", json_path=js, md_path=md)
    md.write_text(md.read_text() + "\nHand-written text.\n")
    figures = {"e2e_p50_ms": (21.5, "e2e p50"), "soak_errors": (0, "errors"), "old_key": (1, "gone next time")}
    report.record_section("serving", "Serving", "ctrserve bench all", figures, ["a note"], machine, path=js)
    report.write_markdown("serving", json_path=js, md_path=md)
    del figures["old_key"]
    figures["e2e_p50_ms"] = (20.0, "e2e p50")
    report.record_section("serving", "Serving", "ctrserve bench all", figures, ["a note"], machine, path=js)
    report.write_markdown("serving", json_path=js, md_path=md)

    data = json.loads(js.read_text())
    assert data["store_fetch_p50_ms"] == 0.3 and data["e2e_p50_ms"] == 20.0 and data["soak_errors"] == 0
    assert "old_key" not in data
    text = md.read_text()
    assert text.count("<!-- bench:serving -->") == 1 and text.count("<!-- bench:store -->") == 1
    assert "Hand-written text." in text
    assert "| `e2e_p50_ms` | 20 | e2e p50 |" in text and "| `soak_errors` | 0 | errors |" in text
    assert "load_avg_1m 7.0" in text and "- a note" in text
