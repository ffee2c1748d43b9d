"""The store benchmark (tiny run) and the generic benchmark report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ctrserve.loadtests import report


@pytest.mark.quick
def test_report_merges_keys_and_replaces_only_its_section(tmp_path: Path) -> None:
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    js.write_text(json.dumps({"other_p50_ms": 1.5}))
    md.write_text("# Benchmarks\n\nhand-written intro\n")
    data = report.record_section("store", "Store", "ctrserve bench store", {"store_x_ms": (0.25, "x")},
                                 machine={"cores": 2}, path=js)
    report.write_markdown("store", data, md_path=md)
    report.write_markdown("store", report.record_section(
        "store", "Store", "ctrserve bench store", {"store_y_ms": (0.5, "y")}, machine={"cores": 2}, path=js),
        md_path=md)
    saved = json.loads(js.read_text())
    assert saved["other_p50_ms"] == 1.5 and saved["store_y_ms"] == 0.5 and "store_x_ms" not in saved
    text = md.read_text()
    assert "hand-written intro" in text and text.count("<!-- bench:store -->") == 1
    assert "| `store_y_ms` | 0.5 | y |" in text and "store_x_ms" not in text


@pytest.mark.redis
def test_store_benchmark_tiny_run() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH")
    from ctrserve.loadtests.bench_store import run

    out = run(n_users=10, n_items=200, max_len=20, candidates=10, rounds=1, per_round=20, record=False,
              cluster=shutil.which("redis-cli") is not None)
    figures = out["figures"]
    if "store_cluster_fetch_p50_ms" in figures:  # the cluster variant and its failover
        assert figures["store_cluster_vs_single"] > 0 and figures["cluster_failover_failed_requests"] > 0
        assert 0 < figures["cluster_failover_error_window_s"] < 30
    assert figures["store_bytes_per_user_L20"] == (8 + 2 * 4 + 4) + (8 + 20 * 3 * 4)
    for key in ("store_fetch_p50_ms", "store_fetch_cached_p50_ms", "store_baseline_async_p50_ms"):
        assert figures[key] > 0
    assert out["hit_rate"] == 1.0
