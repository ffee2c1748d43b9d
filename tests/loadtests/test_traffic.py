"""Traffic model: candidate distributions, Zipf users, request bodies, response checks."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from ctrserve.loadtests.traffic import (
    Bodies,
    CandidateDist,
    Pacer,
    Pool,
    TrafficError,
    ZipfSampler,
    check_response,
    zipf_probs,
)

pytestmark = pytest.mark.quick


@pytest.mark.parametrize(("spec", "kind", "values", "text"), [
    ("uniform:50:500", "uniform", (50, 500), "uniform:50:500"), ("fixed:100", "fixed", (100,), "fixed:100"),
    (" 100", "fixed", (100,), "fixed:100"), ("Choice:1,10,100", "choice", (1, 10, 100), "choice:1,10,100")])
def test_candidate_dist_parse(spec: str, kind: str, values: tuple, text: str) -> None:
    d = CandidateDist.parse(spec)
    assert (d.kind, d.values, d.max, str(d)) == (kind, values, max(values), text)
    assert CandidateDist.parse(str(d)) == d


@pytest.mark.parametrize("spec", ["uniform:500:50", "uniform:5", "uniform:1:2:3", "fixed:0", "fixed:1,2", "normal:3:4",
                                  "choice:a,b", "choice:3,0", ""])
def test_candidate_dist_rejects(spec: str) -> None:
    with pytest.raises(TrafficError, match="candidate distribution"):
        CandidateDist.parse(spec)


def test_uniform_samples_cover_the_range_inclusively() -> None:
    rng = np.random.default_rng(0)
    d = CandidateDist.parse("uniform:3:6")
    draws = [d.sample(rng) for _ in range(2000)]
    assert set(draws) == {3, 4, 5, 6}
    assert abs(np.mean(draws) - 4.5) < 0.1


def test_zipf_probs_and_sampler() -> None:
    p = zipf_probs(100, 1.0)
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) < 0)
    assert p[0] / p[1] == pytest.approx(2.0)  # 1/1 vs 1/2
    assert np.allclose(zipf_probs(5, 0.0), 0.2)
    s = ZipfSampler(100, 1.0, np.random.default_rng(1))
    counts = np.bincount([s.sample() for _ in range(50_000)], minlength=100)
    assert counts.sum() == 50_000
    # every id's share near its probability (the largest binomial std here is 0.0018)
    assert np.abs(counts / 50_000 - p).max() < 0.01
    with pytest.raises(TrafficError):
        zipf_probs(0, 1.0)
    with pytest.raises(TrafficError):
        zipf_probs(10, -1.0)


def _pool() -> Pool:
    return Pool(users=["u1", "u2", "u3"], items=[f"i{k}" for k in range(20)], contexts=[{"hour": "7"}, {}, {}],
                encoded_users=[{"user_id": [2], "hist": [5, 6, 0]}] * 3,
                encoded_items={"item_id": list(range(2, 22)), "price": [0.5] * 20},
                encoded_contexts=[{"hour": 3}, {"hour": 4}, {"hour": 5}])


def test_gateway_bodies_are_valid_cached_and_distinct() -> None:
    bodies = Bodies(_pool(), max_candidates=10, seed=0)
    b = bodies.get(0, 7)
    doc = orjson.loads(b)
    assert doc["user_id"] == "u1" and doc["context"] == {"hour": "7"}
    ids = [c["item_id"] for c in doc["candidates"]]
    assert len(ids) == 7 and len(set(ids)) == 7
    assert bodies.get(0, 7) is b and bodies.get.cache_info().misses == 1  # built once per (user, count)
    assert [c["item_id"] for c in orjson.loads(bodies.get(0, 3))["candidates"]] == ids[:3]
    assert orjson.loads(bodies.get(1, 7))["user_id"] == "u2"


def test_cache_is_bounded() -> None:
    bodies = Bodies(_pool(), max_candidates=10, cache_size=2)
    for n in range(1, 6):
        bodies.get(0, n)
    assert bodies.get.cache_info().currsize == 2 and bodies.get.cache_info().misses == 5


def test_baseline_bodies_carry_encoded_features() -> None:
    bodies = Bodies(_pool(), max_candidates=10, mode="baseline")
    doc = orjson.loads(bodies.get(1, 4))
    assert doc["user"] == {"user_id": [2], "hist": [5, 6, 0]}
    assert len(doc["candidates"]["item_id"]) == 4 and doc["candidates"]["hour"] == [4] * 4


def test_bodies_reject_bad_settings(tmp_path) -> None:
    with pytest.raises(TrafficError, match="pool has 20 items"):
        Bodies(_pool(), max_candidates=21)
    with pytest.raises(TrafficError, match="mode"):
        Bodies(_pool(), 5, mode="other")
    no_enc = Pool(users=["u"], items=["i"], contexts=[{}])
    with pytest.raises(TrafficError, match="encoded"):
        Bodies(no_enc, 1, mode="baseline")
    with pytest.raises(TrafficError, match="not found"):
        Pool.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"users": []}')
    with pytest.raises(TrafficError, match="not a valid pool"):
        Pool.load(tmp_path / "bad.json")


def test_pool_roundtrip(tmp_path) -> None:
    _pool().save(tmp_path / "p.json")
    assert Pool.load(tmp_path / "p.json") == _pool()


@pytest.mark.parametrize(("status", "body", "n", "error", "arm"), [
    (200, b'{"arm": "control", "scores": [0.1, 0.9, 0, 1]}', 4, None, "control"),
    (200, b'{"arm": "control", "scores": [0.1]}', 4, "1 scores for 4 candidates", "control"),
    (200, b'{"arm": "t", "scores": [0.1, 1.5]}', 2, "outside [0, 1]", "t"),
    (200, b'{"arm": "t", "scores": [0.1, true]}', 2, "outside [0, 1]", "t"),
    (200, b'{"arm": "t", "scores": [0.1, "0.2"]}', 2, "outside [0, 1]", "t"),
    (200, b'not json', 1, "not JSON", "?"),
    (200, b'[1]', 1, "not a JSON object", "?"),
    (200, b'{"arm": "a"}', 1, "no scores", "a"),
    (503, b'{"error": {"code": "store_unavailable"}}', 1, "HTTP 503", "?"),
    (0, None, 1, "HTTP 0", "?"),
])
def test_check_response(status: int, body: bytes | None, n: int, error: str | None, arm: str) -> None:
    err, got_arm = check_response(status, body, n)
    assert got_arm == arm
    if error is None:
        assert err is None
    else:
        assert err is not None and error in err


def simulate(pacers: list[Pacer], service_s: float, until: float, stall: tuple[float, float] | None = None
             ) -> list[list[float]]:
    """Send times of each paced client against an instant server (``service_s`` per request, no
    queueing: only the schedule is under test); ``stall=(at, length)`` freezes the clients once."""
    sends: list[list[float]] = [[] for _ in pacers]
    nxt = [p.window + p.first_delay() for p in pacers]
    while min(nxt) < until:
        k = int(np.argmin(nxt))
        t = nxt[k]
        if stall and stall[0] <= t < stall[0] + stall[1]:
            t = stall[0] + stall[1]  # the client's event loop was busy: the send is late
        sends[k].append(t)
        done = t + service_s
        nxt[k] = done + pacers[k].next_delay(done)
    return sends


def test_pacer_keeps_the_rate_one_request_per_period_and_no_phase_lock() -> None:
    period, n = 0.04, 4
    pacers = [Pacer(period, np.random.default_rng((0, k)), now=0.0) for k in range(n)]
    sends = simulate(pacers, 0.003, 20.0, stall=(5.0, 0.2))
    for times in sends:
        assert abs(len(times) - 20.0 / period) <= 6  # the rate holds (the stall costs a few sends)
        before = np.asarray(times)[np.asarray(times) < 5.0]  # the schedule's grid until the stall
        windows = np.floor(before / period + 1e-9)
        assert len(np.unique(windows)) == len(windows) == 5.0 / period, "one request per period"
    after = np.sort(np.concatenate([np.asarray(t)[np.asarray(t) > 6.0] for t in sends]))
    gaps = np.diff(after)
    # independent clients: the share of sends within 0.5 ms of the previous one is what chance gives
    # (~0.05 for 4 clients at 100 req/s), not the 3-in-4 of phase-locked clients
    assert (gaps < 0.0005).mean() < 0.15


def test_pacer_does_not_burst_to_catch_up_after_overload() -> None:
    p = Pacer(0.01, np.random.default_rng(1), now=0.0)
    p.first_delay()
    assert p.next_delay(now=1.0) <= 0.01  # 100 periods behind: the schedule restarts, one request next
    delays = [p.next_delay(now=1.0 + 0.01 * k + 0.001) for k in range(1, 50)]
    assert min(delays) >= 0.0 and np.mean(delays) > 0.003
    with pytest.raises(TrafficError, match="period"):
        Pacer(0.0, np.random.default_rng(1), now=0.0)
