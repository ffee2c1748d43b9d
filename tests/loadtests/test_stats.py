"""Summary math: percentiles, rates, saturation, the queueing bound of ideal servers,
Prometheus histogram deltas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ctrserve.loadtests.stats import (
    fifo_responses,
    histogram_delta,
    parse_prometheus,
    percentiles,
    saturation,
    stage_breakdown,
    summarize,
)

pytestmark = pytest.mark.quick


def test_summarize_known_numbers() -> None:
    t = np.arange(11, dtype=float)  # 11 completions over 10 s
    ms = np.arange(1, 12, dtype=float)  # 1..11 ms
    cands = np.full(11, 100)
    ok = np.ones(11, bool)
    ok[3] = False
    s = summarize(t, ms, cands, ok)
    assert s.requests == 11 and s.errors == 1 and s.error_rate == pytest.approx(1 / 11)
    assert s.p50_ms == 6.0 and s.max_ms == 11.0 and s.mean_ms == 6.0
    assert s.p99_ms == pytest.approx(10.9)
    assert s.rps == pytest.approx(1.0)
    assert s.candidates_per_s == pytest.approx(1.0 * 1000 / 11)  # only answered candidates count
    assert s.duration_s == 10.0


def test_summarize_skips_ramp_up_and_rejects_empty() -> None:
    t = np.array([0.0, 0.5, 2.0, 3.0, 4.0])
    ms = np.array([100.0, 100.0, 1.0, 2.0, 3.0])
    s = summarize(t, ms, np.ones(5), np.ones(5, bool), skip_s=1.0)
    assert s.requests == 3 and s.max_ms == 3.0 and s.rps == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no requests"):
        summarize(np.array([]), np.array([]), np.array([]), np.array([], bool))


def test_percentiles_of_nothing_are_nan() -> None:
    assert all(math.isnan(x) for x in percentiles(np.array([])))


@pytest.mark.parametrize(("steps", "peak", "seen"), [
    ([(1, 10.0), (2, 19.0), (4, 30.0), (8, 30.5), (16, 29.0)], 2, True),  # two steps < 5 % above 30: knee at 4
    ([(1, 10.0), (2, 19.0), (4, 30.0), (8, 28.0), (16, 27.0)], 2, True),  # falls: peak at 4
    ([(1, 10.0), (2, 19.0), (4, 30.0), (8, 30.5)], 2, False),  # one flat step: look further
    ([(1, 10.0), (2, 19.0), (4, 28.0), (8, 31.0), (16, 31.5), (32, 31.0)], 3, True),  # 28 is > 5 % below 31.5
    ([(1, 266.0), (2, 274.0), (4, 400.0)], 2, False),           # flat, then a jump (auto execution)
    ([(1, 266.0), (2, 274.0), (4, 400.0), (8, 410.0), (16, 405.0)], 2, True),
    ([(1, 10.0), (2, 19.0), (4, 30.0)], 2, False),              # still growing
    ([(1, 10.0)], 0, False),
])
def test_saturation(steps: list, peak: int, seen: bool) -> None:
    assert saturation(steps) == (peak, seen)


def _metrics(observations: dict[str, list[float]], request: list[float]) -> str:
    reg = CollectorRegistry()
    stage = Histogram("ctrserve_stage_seconds", "", ["stage", "arm"], buckets=(0.001, 0.01, 0.1), registry=reg)
    req = Histogram("ctrserve_request_seconds", "", ["route", "arm", "status"], buckets=(0.001, 0.01, 0.1),
                    registry=reg)
    for name, xs in observations.items():
        for arm in ("a", "b"):
            for x in xs:
                stage.labels(name, arm).observe(x)
    for x in request:
        req.labels("/v1/score", "a", "200").observe(x)
    req.labels("/v1/score", "a", "503").observe(5.0)  # an error: not part of the breakdown
    return generate_latest(reg).decode()


def test_stage_breakdown_takes_the_window_delta() -> None:
    before = parse_prometheus(_metrics({"inference": [0.05]}, [0.06]))
    after = parse_prometheus(_metrics({"inference": [0.05, 0.002, 0.004], "feature_fetch": [0.0005]},
                                      [0.06, 0.003, 0.005]))
    st = stage_breakdown(before, after)
    assert st["inference"]["count"] == 4  # 2 new observations x 2 arms
    assert st["inference"]["mean_ms"] == pytest.approx(3.0)
    assert st["feature_fetch"]["mean_ms"] == pytest.approx(0.5)
    assert st["request_in_app"]["count"] == 2 and st["request_in_app"]["mean_ms"] == pytest.approx(4.0)
    assert "assembly" not in st
    count, total = histogram_delta(before, after, "ctrserve_stage_seconds", stage="inference", arm="a")
    assert count == 2 and total == pytest.approx(0.006)


def test_single_server_serves_spaced_arrivals_without_waiting() -> None:
    out = fifo_responses(np.array([0.0, 0.01, 0.02]), np.array([2.0]))
    assert out.tolist() == [2.0, 2.0, 2.0]


def test_single_server_queues_simultaneous_arrivals_in_order() -> None:
    # answered in arrival order whatever the input order: the second waits 1 ms, the one arriving
    # at 0.5 ms waits until 2 ms
    out = fifo_responses(np.array([0.0005, 0.0, 0.0]), np.array([1.0]))
    assert out.tolist() == [1.0, 2.0, 2.5]


def test_single_server_matches_the_pollaczek_khinchine_mean_wait() -> None:
    # M/D/1 at utilisation 0.5, service 1 ms: mean wait rho * S / (2 (1 - rho)) = 0.5 ms
    rng = np.random.default_rng(7)
    arrivals = np.cumsum(rng.exponential(2e-3, size=200_000))
    out = fifo_responses(arrivals, np.array([1.0]))
    assert abs((out - 1.0).mean() - 0.5) < 0.02


def test_fifo_servers_reject_empty_inputs_and_no_servers() -> None:
    with pytest.raises(ValueError):
        fifo_responses(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError):
        fifo_responses(np.array([0.0]), np.array([1.0]), servers=0)


def test_two_servers_take_simultaneous_arrivals_at_once() -> None:
    out = fifo_responses(np.array([0.0, 0.0, 0.0]), np.array([1.0]), servers=2)
    assert out.tolist() == [1.0, 1.0, 2.0]


def test_two_servers_match_the_erlang_c_mean_wait() -> None:
    # M/M/2 at utilisation 0.5 per server, mean service 1 ms: P(wait) = 1/3, mean wait = P(wait) * S / (c (1 - rho))
    # = 1/3 ms
    rng = np.random.default_rng(11)
    arrivals = np.cumsum(rng.exponential(1e-3, size=200_000))
    out = fifo_responses(arrivals, rng.exponential(1.0, size=200_000), servers=2, seed=3)
    assert abs(out.mean() - 1.0 - 1 / 3) < 0.03


@pytest.mark.parametrize("command", ["load", "all"])
def test_a_bad_execution_fails_before_anything_starts(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench load` and `bench all` refuse an execution the gateway does not know up front, with
    one error line (bench all used to fail only when its gateway started, after the model sections)."""
    from typer.testing import CliRunner

    from ctrserve.loadtests import bench_all, bench_load, bench_store, report
    from ctrserve.loadtests.cli import bench_app
    from ctrserve.loadtests.stack import GatewaySetup

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark started before checking --execution")

    # the first things each would do (and nothing may reach docs/ from a test)
    for module, name in ((bench_load, "ensure_run"), (bench_all, "ensure_run"), (bench_store, "run"),
                         (report, "record_section")):
        monkeypatch.setattr(module, name, started)
    result = CliRunner().invoke(bench_app, [command, "--candidates", "fixed:10", "--execution", "fast"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "execution must be one of thread, inline, auto, got 'fast'" in " ".join(result.output.split())
    assert GatewaySetup(execution="auto").execution == "auto"  # a known one passes
