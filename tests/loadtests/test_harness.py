"""The benchmark harness: the figures table, the step runner, the interleaved timing schedule,
the statistics of a latency sample, the saturation ladder and the target verdicts of bench all
(the rule that benchmark code reaches torch only through export/ is tests/test_import_graph.py's)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctrserve.loadtests import bench_all_load, harness

pytestmark = pytest.mark.quick
LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"


def test_figures_keep_order_refuse_duplicates_and_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrserve.loadtests import report

    fig = harness.Figures()
    fig.add("b_ms", 2.5, "second")
    fig.add("a_ms", 1, "first")
    assert list(fig.values()) == ["b_ms", "a_ms"] and fig["a_ms"] == 1
    with pytest.raises(KeyError, match="twice"):
        fig.add("a_ms", 3, "again")
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    monkeypatch.setattr(report, "BENCH_JSON", js)
    monkeypatch.setattr(report, "BENCH_MD", md)
    fig.record("sec", "Section", "ctrserve bench x", ["a note"], {"cores": 2})
    data = json.loads(js.read_text())
    assert data["b_ms"] == 2.5 and data["sections"]["sec"]["figures"] == {"b_ms": "second", "a_ms": "first"}
    assert "| `a_ms` | 1 | first |" in md.read_text()


def test_run_steps_runs_in_order_and_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 100.04, 105.0, 107.26])  # step one takes 0.04 s, step two 2.26 s
    monkeypatch.setattr(harness, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    done, lines = [], []
    seconds = harness.run_steps("bench x", [("one", lambda: done.append(1)), ("two", lambda: done.append(2))],
                                lines.append)
    assert done == [1, 2] and lines == ["[bench x] 1/2 one", "[bench x] 2/2 two"]
    assert seconds == {"one": 0.0, "two": 2.3}  # per step, to a tenth of a second


def test_interleave_alternates_rounds_and_drops_the_warmup() -> None:
    calls: list[tuple[str, int]] = []
    variants = {name: (lambda i, name=name: calls.append((name, i))) for name in ("a", "b")}
    samples = harness.interleave(variants, rounds=2, per_round={"a": 2, "b": 1}, alternate=True, warmup=1)
    # round 0 (warm-up, a then b), round 1 reversed (b then a), round 2 (a then b); same indices per round
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("a", 3), ("a", 4), ("a", 5), ("b", 2)]
    assert [len(samples["a"]), len(samples["b"])] == [4, 2]


def test_interleave_async_awaits_coroutines() -> None:
    seen: list[int] = []

    async def fetch(i: int) -> None:
        seen.append(i)

    samples = asyncio.run(harness.interleave_async({"sync": lambda i: None, "async": fetch}, 2, 3, warmup=1))
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 8] and len(samples["async"]) == len(samples["sync"]) == 6


def test_latency_stats() -> None:
    stats = harness.latency_stats(list(range(1, 102)))
    assert stats == {"p50": 51.0, "p99": 100.0, "mean": 51.0} and harness.p50([3.0, 1.0, 2.0]) == 2.0
    assert all(math.isnan(v) for v in harness.latency_stats([]).values())


def test_ladder_doubles_up_to_the_limit() -> None:
    assert bench_all_load.ladder((1, 4, 16)) == [1, 4, 16, 32, 64]
    assert bench_all_load.ladder((64,)) == [64]


def test_verdicts_say_met_or_by_how_much_missed() -> None:
    values = {"e2e_over_ort_p50": 1.5, "p99_over_p50_half_saturation": 2.0, "soak_errors": 3,
              "gateway_over_ort_throughput": 0.4, "ort_gflops_over_peak": 0.6}
    lines = bench_all_load.verdicts(values)
    assert lines[0] == "Target e2e p50 <= 1.25 x raw ORT p50: MISSED (e2e_over_ort_p50 = 1.5; 1.20x off)."
    assert lines[1].endswith(": met (p99_over_p50_half_saturation = 2).")
    assert lines[2].endswith("MISSED (soak_errors = 3; 3 errors).")
    assert "2.00x off" in lines[3] and ": met" in lines[4]

