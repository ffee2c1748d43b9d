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
    values = {"e2e_over_ort_p50": 1.56, "p99_over_p50_half_saturation": 2.0, "soak_errors": 3,
              "gateway_over_ort_throughput_locust_free": 0.5, "ort_gflops_over_peak": 0.6}
    lines = bench_all_load.verdicts(values)
    assert lines[0] == ("Target e2e p50 <= 1.30 x raw ORT p50 (lone request): MISSED (e2e_over_ort_p50 = 1.56; "
                        "1.20x off).")
    assert lines[1].endswith(": met (p99_over_p50_half_saturation = 2).")
    assert lines[2].endswith("MISSED (soak_errors = 3; 3 errors).")
    assert "2.00x off" in lines[3] and ": met" in lines[4]
    assert len(lines) == 5  # no batched GFLOP/s verdict without batching
    assert "batched" in bench_all_load.verdicts({**values, "batched_gflops_over_peak": 0.3})[4]


def test_batch_window_reads_mean_batch_and_queue_wait_from_the_gateway_metrics() -> None:
    from ctrserve.loadtests.stats import parse_prometheus

    def scrape(requests: int, calls: float, waits: dict[str, int]) -> dict:
        lines = [f'ctrserve_batch_requests_count{{arm="a"}} {requests}', 'ctrserve_batch_requests_sum{arm="a"} 0',
                 f'ctrserve_batch_calls_total{{arm="a"}} {calls}',
                 *(f'ctrserve_queue_wait_seconds_bucket{{arm="a",le="{le}"}} {n}' for le, n in waits.items())]
        return parse_prometheus("\n".join(["# TYPE ctrserve_batch_requests histogram",
                                             "# TYPE ctrserve_batch_calls counter",
                                             "# TYPE ctrserve_queue_wait_seconds histogram", *lines]) + "\n")

    before = scrape(10, 10.0, {"0.0001": 10, "0.001": 10, "+Inf": 10})
    # 40 more requests in 10 calls; waits: 20 under 0.1 ms, 20 between 0.1 and 1 ms
    after = scrape(50, 20.0, {"0.0001": 30, "0.001": 50, "+Inf": 50})
    w = bench_all_load.batch_window(before, after)
    assert w["batch_requests"] == pytest.approx(4.0)
    assert w["queue_wait_p50_ms"] == pytest.approx(0.1)  # the 20th of 40 is the last under 0.1 ms
    assert w["queue_wait_p99_ms"] == pytest.approx(0.1 + 0.9 * 19.6 / 20)
    assert bench_all_load.batch_window(before, before) == {}



def test_a_batched_run_records_beside_the_default_one() -> None:
    from ctrserve.loadtests.harness import Figures

    fig = Figures()
    fig.add("e2e_p50_ms", 2.5, "e2e")
    fig.add("queue_wait_p50_ms", 0.01, "wait")
    out = fig.renamed(lambda k: k if k in bench_all_load.BATCHING_FIGURES else f"batched_{k}")
    assert out.table == {"batched_e2e_p50_ms": (2.5, "e2e"), "queue_wait_p50_ms": (0.01, "wait")}
    with pytest.raises(KeyError, match="twice"):
        fig.renamed(lambda k: "same")
