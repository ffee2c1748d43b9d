"""End to end with real processes: redis-server (bulk-loaded from a prepared dataset), a trained
DeepFM exported to ONNX (two versions), the gateway as a ``ctrserve serve`` subprocess over TCP,
and the local tritonserver. Parity with PyTorch, the A/B split, hot reload under load, and every
failure mode's status code."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from gateway_e2e import ADMIN_TOKEN, ROUTING_E2E, GatewayProcess, probes, reference_scores

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

ARM_VERSION = {"control": 1, "treatment": 2}


@pytest.fixture(scope="module")
def routing_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("routing") / "routing.yaml"
    p.write_text(ROUTING_E2E)
    return p


@pytest.fixture(scope="module")
def gateway(exported, store_url, routing_path, tmp_path_factory):
    """The gateway on embedded ONNX Runtime, routing control (v1, 70 %) / treatment (v2, 30 %)."""
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    gw = GatewayProcess(exported.repo, store_url, log, env={"CTRSERVE_API_ADMIN_TOKEN": ADMIN_TOKEN},
                        args=["--routing", str(routing_path)])
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


def _score_all(url: str, bodies: list[dict], headers: dict | None = None, concurrency: int = 16) -> list:
    """POST every body concurrently over one keep-alive pool; returns responses in order."""
    async def run() -> list:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            sem = asyncio.Semaphore(concurrency)

            async def one(body: dict) -> httpx.Response:
                async with sem:
                    return await client.post("/v1/score", json=body, headers=headers)

            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(run())


def _check_parity(url: str, exported, arm: str | None, label: str) -> float:
    worst = 0.0
    for probe in probes(exported.prepared):
        headers = {"X-Ctrserve-Arm": arm} if arm else None
        r = httpx.post(url + "/v1/score", json=probe.body, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "ctr" and "flags" not in out, out
        ref = reference_scores(exported.runs[out["version"]], exported.prepared, probe.rows)
        diff = float(np.max(np.abs(np.asarray(out["scores"]) - ref)))
        worst = max(worst, diff)
        assert diff <= 1e-4, f"{label}: user {probe.body['user_id']} differs from PyTorch by {diff:.2e}"
    print(f"\n{label}: max |gateway - pytorch| = {worst:.2e}")
    return worst


def test_scores_equal_pytorch_over_http(gateway, exported) -> None:
    for arm in ("control", "treatment"):
        _check_parity(gateway.url, exported, arm, f"onnxruntime {arm}")


def _sample(metrics: str, name: str, labels: str) -> float:
    key = f"{name}{{{labels}}}" if labels else name
    for line in metrics.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{key} not on /metrics")


def test_metrics_show_the_feature_store_item_cache(gateway, exported) -> None:
    """The feature store's item-cache series reach the gateway's /metrics: the same request twice,
    the second one's candidates come from the in-process cache."""
    body = probes(exported.prepared)[0].body
    n = len({c["item_id"] for c in body["candidates"]})
    name = "ctrserve_feature_store_item_cache_lookups_total"
    before = httpx.get(gateway.url + "/metrics", timeout=10).text
    hits0 = _sample(before, name, 'result="hit"') if f"{name}{{" in before else 0.0
    for _ in range(2):
        assert httpx.post(gateway.url + "/v1/score", json=body, timeout=10).status_code == 200
    after = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert _sample(after, name, 'result="hit"') - hits0 >= n
    assert f'{name}{{result="miss"}} ' in after, "the miss series is not on /metrics"
    assert 0 < _sample(after, "ctrserve_feature_store_item_cache_hit_ratio", "") <= 1


def test_ab_split_is_deterministic_and_matches_weights(gateway, exported, store_url, tmp_path) -> None:
    """10,000 users assigned by the running gateway: within 2 pp of the weights; 1,000 of them
    scored through /v1/score land on the same arm; a second replica assigns every user the same."""
    from ctrserve.service.routing import Router, parse_yaml

    users = [f"user-{i}" for i in range(10_000)]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = httpx.post(gateway.url + "/admin/routing/assign", json={"user_ids": users}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    arms = r.json()["arms"]
    counts = Counter(arms)
    share = counts["treatment"] / len(arms)
    print(f"\n10,000 users: {dict(counts)} (treatment {share:.2%}, configured 30 %)")
    assert abs(share - 0.30) <= 0.02
    # the scoring path routes exactly as the assignment endpoint says, and serves the arm's version
    t0 = time.perf_counter()
    scored = _score_all(gateway.url, [{"user_id": u, "candidates": [{"item_id": "1"}]} for u in users[:1000]])
    print(f"1,000 scoring requests over HTTP in {time.perf_counter() - t0:.1f} s")
    assert [x.status_code for x in scored] == [200] * 1000
    assert [x.json()["arm"] for x in scored] == arms[:1000]
    assert all(x.json()["version"] == ARM_VERSION[x.json()["arm"]] for x in scored)
    # deterministic: the same pure function of (salt, user) here, and in a second replica process
    router = Router(parse_yaml(ROUTING_E2E))
    assert arms == [router.assign(u).arm for u in users]
    replica = GatewayProcess(exported.repo, store_url, tmp_path / "replica.log",
                             env={"CTRSERVE_API_ADMIN_TOKEN": ADMIN_TOKEN},
                             args=["--routing", gateway_routing(gateway)])
    try:
        replica.wait_ready()
        again = httpx.post(replica.url + "/admin/routing/assign", json={"user_ids": users}, headers=auth, timeout=30)
        assert again.json()["arms"] == arms
    finally:
        replica.stop()


def gateway_routing(gw: GatewayProcess) -> str:
    cmd = gw.proc.args
    return cmd[cmd.index("--routing") + 1]


def test_hot_reload_under_concurrent_requests_drops_none(gateway) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    # v2 only: v1 is released while requests may still be using it; then v1 is loaded again
    only_v2 = ("experiments: [{name: main, salt: e2e-2026, arms: [{name: treatment, model: ctr, version: 2, "
               "weight: 100}]}]")
    configs = [only_v2, ROUTING_E2E] * 3

    async def run() -> tuple[list[int], Counter, list[int]]:
        statuses: list[int] = []
        versions: Counter = Counter()
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            async def worker(w: int) -> None:
                i = 0
                while not stop.is_set():
                    r = await client.post("/v1/score", json={"user_id": f"w{w}-{i}", "candidates": [
                        {"item_id": "1"}, {"item_id": "2"}]})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions[r.json()["version"]] += 1
                    i += 1

            workers = [asyncio.create_task(worker(w)) for w in range(12)]
            reloads = []
            for cfg in configs:
                await asyncio.sleep(0.25)
                r = await client.put("/admin/routing", content=cfg, headers=auth)
                reloads.append(r.status_code)
            await asyncio.sleep(0.25)
            stop.set()
            await asyncio.gather(*workers)
        return statuses, versions, reloads

    statuses, versions, reloads = asyncio.run(run())
    print(f"\nhot reload: {len(reloads)} swaps during {len(statuses)} requests; statuses {Counter(statuses)}")
    assert reloads == [200] * len(configs)
    assert set(statuses) == {200}, Counter(statuses)
    assert versions[1] and versions[2]


def test_failure_modes_over_http(gateway) -> None:
    url = gateway.url + "/v1/score"
    good = {"user_id": "1", "candidates": [{"item_id": "1"}]}
    cases = [
        ({**good, "model": "nope"}, {}, 404),
        ({**good, "model": "ctr:9"}, {}, 404),
        (good, {"X-Ctrserve-Arm": "nope"}, 404),
        ({**good, "candidates": []}, {}, 422),
        ({**good, "candidates": [{"item_id": "1"}] * 1001}, {}, 422),
        ({**good, "extra": True}, {}, 422),
        ({**good, "context": {"no_such_feature": 1}}, {}, 422),
        ({**good, "context": {"age": "not a number"}}, {}, 422),
        ({"candidates": [{"item_id": "1"}]}, {}, 422),
    ]
    for body, headers, status in cases:
        r = httpx.post(url, json=body, headers=headers, timeout=10)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"user_id": ', headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    r = httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413
    r = httpx.put(gateway.url + "/admin/routing", content=ROUTING_E2E, timeout=10)
    assert r.status_code == 401
    r = httpx.put(gateway.url + "/admin/routing", content="experiments: []",
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 422
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert "ctrserve_stage_seconds_bucket" in metrics and 'route="/v1/score"' in metrics


# -- Triton ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton(triton_install, exported):
    from ctrserve.export import triton_local

    try:  # installed (else triton_install skipped) but not starting: a failure
        server = triton_local.start(exported.repo)
    except triton_local.TritonError as exc:
        pytest.fail(f"local tritonserver did not start: {exc}")
    yield server
    os.kill(server.process.pid, signal.SIGCONT)  # in case a test left it stopped
    server.stop()


@pytest.fixture(scope="module")
def triton_gateway(exported, store_url, routing_path, triton, tmp_path_factory):
    log = tmp_path_factory.mktemp("gw-triton") / "gateway.log"
    gw = GatewayProcess(exported.repo, store_url, log, env={"CTRSERVE_BACKEND_TIMEOUT_MS": "1500",
                                                            "CTRSERVE_API_DEADLINE_MS": "4000"},
                        args=["--routing", str(routing_path), "--triton-url", triton.grpc_url])
    try:
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()


@pytest.mark.triton
def test_triton_scores_equal_pytorch(triton_gateway, exported) -> None:
    for arm in ("control", "treatment"):
        _check_parity(triton_gateway.url, exported, arm, f"triton {arm}")


@pytest.mark.triton
def test_triton_stalled_gives_504_then_recovers(triton_gateway, triton) -> None:
    body = {"user_id": "1", "candidates": [{"item_id": "1"}]}
    os.kill(triton.process.pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        r = httpx.post(triton_gateway.url + "/v1/score", json=body, timeout=10)
        waited = time.perf_counter() - t0
    finally:
        os.kill(triton.process.pid, signal.SIGCONT)
    assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout", r.text
    assert 1.0 < waited < 3.5, waited
    for _ in range(50):  # the channel recovers once Triton runs again
        r = httpx.post(triton_gateway.url + "/v1/score", json=body, timeout=10)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text


@pytest.mark.triton
def test_graceful_shutdown_drains_in_flight_requests(triton_gateway, triton) -> None:
    """SIGTERM while requests wait on a stalled backend: they still complete, then it shuts down."""
    body = {"user_id": "1", "candidates": [{"item_id": "1"}, {"item_id": "2"}]}

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=triton_gateway.url, timeout=15) as client:
            os.kill(triton.process.pid, signal.SIGSTOP)
            try:
                tasks = [asyncio.create_task(client.post("/v1/score", json=body)) for _ in range(4)]
                await asyncio.sleep(0.4)  # the requests are in flight, blocked in inference
                triton_gateway.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.4)
            finally:
                os.kill(triton.process.pid, signal.SIGCONT)
            return [r.status_code for r in await asyncio.gather(*tasks)]

    statuses = asyncio.run(run())
    assert statuses == [200] * 4
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete: the conventional exit status
    assert triton_gateway.proc.wait(20) in (0, -signal.SIGTERM)
    assert '"msg":"gateway stopped"' in triton_gateway.log_tail(), triton_gateway.log_tail()
    with pytest.raises(httpx.ConnectError):
        httpx.get(triton_gateway.url + "/healthz", timeout=2)


# -- Redis slow / down (last: they stop the shared redis-server) ----------------------------------
def _in_process_app(exported, store_url: str, routing_path: Path, redis_timeout_ms: float,
                    store: dict | None = None, backend: dict | None = None, **redis: object):
    """An in-process gateway on the session's Redis, models and routing (``store`` / ``backend``:
    keyword arguments of StoreSettings / BackendSettings; ``redis``: of RedisStoreConfig)."""
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.service.app import create_app
    from ctrserve.service.features import redis_factory
    from ctrserve.service.settings import (
        ApiSettings,
        BackendSettings,
        FeedbackSettings,
        GatewaySettings,
        RoutingSettings,
        ServerSettings,
        StoreSettings,
    )

    # the closed loop on, as in production: its writer shares the event loop and Redis with the
    # read path, and every test's shutdown stops it (tests/service/test_events_e2e.py tests the loop)
    settings = GatewaySettings(server=ServerSettings(access_log=False), api=ApiSettings(),
                               store=StoreSettings(**(store or {})),
                               routing=RoutingSettings(config=routing_path),
                               backend=BackendSettings(model_repository=exported.repo, **(backend or {})),
                               feedback=FeedbackSettings(enabled=True))
    return create_app(settings, redis_factory(RedisStoreConfig(url=store_url, timeout_ms=redis_timeout_ms, **redis)))


@asynccontextmanager
async def _local_client(app, timeout: float = 5.0) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the in-process ``app``, its lifespan running and the app ready to score."""
    from ctrserve.service.app import wait_ready

    async with app.router.lifespan_context(app):
        await wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=timeout) as local:
            yield local


def _zero(calls: dict[str, int]) -> None:
    """Every count back to 0."""
    calls.update(dict.fromkeys(calls, 0))


@pytest.fixture()
def degraded_app(exported, store_url, routing_path):
    """An in-process gateway in degrade mode on the same Redis, model and routing."""
    return _in_process_app(exported, store_url, routing_path, 1000, store={"failure": "degrade", "timeout_ms": 300})


def test_thread_and_inline_execution_give_the_same_answers(gateway, exported, store_url, routing_path) -> None:
    """The subprocess gateway runs the default execution, `auto`, whose lone requests (these probes,
    one at a time) run inline (blocking Redis read, inference on the event loop); an in-process
    gateway in thread mode (awaited read, inference on its worker thread) on the same Redis, models
    and routing answers every probe identically."""

    app = _in_process_app(exported, store_url, routing_path, 100, backend={"execution": "thread"})
    assert httpx.get(gateway.url + "/readyz", timeout=10).status_code == 200

    async def run() -> None:
        async with _local_client(app) as local, httpx.AsyncClient(base_url=gateway.url, timeout=10) as remote:
            for probe in probes(exported.prepared):
                a = await remote.post("/v1/score", json=probe.body)
                b = await local.post("/v1/score", json=probe.body)
                assert a.status_code == b.status_code == 200, (a.text, b.text)
                ja, jb = a.json(), b.json()
                assert ja.pop("request_id") != jb.pop("request_id")
                assert ja == jb

    asyncio.run(run())


def _count_blocking_reads(monkeypatch) -> dict[str, int]:
    """Counts of the store's blocking reads: ``begin`` (asked), ``sent`` (a pending read returned),
    ``collected`` (its ``result()``), ``plain`` (``read``: begin and collect at once), ``busy_max``
    (the most reads in flight at once)."""
    from ctrserve.feature_store.blocking import RedisBlockingReader

    calls = {"begin": 0, "sent": 0, "collected": 0, "plain": 0, "busy_max": 0}
    begin, plain = RedisBlockingReader.begin, RedisBlockingReader.read

    def counting_begin(self, *a, **kw):
        calls["begin"] += 1
        pending = begin(self, *a, **kw)
        if pending is not None:
            calls["sent"] += 1
            calls["busy_max"] = max(calls["busy_max"], self.pool.busy)
            pending = _Counted(pending, calls)
        return pending

    def counting_plain(self, *a, **kw):
        calls["plain"] += 1
        return plain(self, *a, **kw)

    monkeypatch.setattr(RedisBlockingReader, "begin", counting_begin)
    monkeypatch.setattr(RedisBlockingReader, "read", counting_plain)
    return calls


class _Counted:
    """A pending read whose ``result()`` is counted."""

    def __init__(self, inner, calls: dict[str, int]):
        self.inner, self.calls = inner, calls

    def result(self):
        self.calls["collected"] += 1
        return self.inner.result()

    def cancel(self) -> None:
        self.inner.cancel()


def test_inline_sends_the_store_read_before_validation_and_never_leaks_it(exported, store_url, routing_path,
                                                                          monkeypatch) -> None:
    """Inline execution sends the feature-store read as soon as the body is decoded (``begin_read``)
    and scoring collects it: the answers equal those of the usual read (thread execution, checked
    above), numeric item ids qualify, and a read sent for a body that then fails validation or
    routing is drained — on a pool of ONE Redis connection, where a leaked one would stall every
    later request."""

    calls = _count_blocking_reads(monkeypatch)
    # the Redis socket timeout equal to the store budget: the blocking read is used (a longer one
    # sends reads through the awaited path)
    app = _in_process_app(exported, store_url, routing_path, 400, store={"timeout_ms": 400}, pool_size=1)
    probe = probes(exported.prepared)[0]
    answers: list[httpx.Response] = []

    async def run() -> None:
        async with _local_client(app, timeout=10) as local:
            first = await local.post("/v1/score", json=probe.body)  # adopts the store version
            answers.append(first)
            assert first.status_code == 200, first.text
            _zero(calls)
            again = await local.post("/v1/score", json=probe.body)
            assert again.status_code == 200 and again.json()["scores"] == first.json()["scores"]
            assert calls == {"begin": 1, "sent": 1, "collected": 1, "plain": 0, "busy_max": 1}, calls
            # integer item ids (pydantic turns them into the same strings) qualify too
            as_int = {**probe.body, "candidates": [{"item_id": 10**12 + k} for k in range(3)]}
            as_str = {**probe.body, "candidates": [{"item_id": str(10**12 + k)} for k in range(3)]}
            r_int, r_str = await local.post("/v1/score", json=as_int), await local.post("/v1/score", json=as_str)
            assert r_int.status_code == r_str.status_code == 200, (r_int.text, r_str.text)
            assert r_int.json()["scores"] == r_str.json()["scores"]
            assert r_int.json()["flags"] == r_str.json()["flags"]  # unknown items, flagged alike
            assert calls == {"begin": 3, "sent": 3, "collected": 3, "plain": 0, "busy_max": 1}, calls
            bad = [{**probe.body, "unexpected": 1},  # 422 after the read was sent
                   {**probe.body, "model": "no-such-model"},  # 404: not routed, nothing sent
                   {**probe.body, "context": {"no_such_feature": 1}}]  # 422 from the assembler
            for body in bad:
                r = await local.post("/v1/score", json=body)
                assert r.status_code in (404, 422), r.text
            assert calls["begin"] >= 4
            for _ in range(3):  # the single connection still answers, with the right reply
                r = await local.post("/v1/score", json=probe.body)
                assert r.status_code == 200 and r.json()["scores"] == first.json()["scores"]
        # CTRSERVE_STORE_EARLY_READ=false: the read waits for validation (the plain blocking read)
        late = _in_process_app(exported, store_url, routing_path, 400, store={"timeout_ms": 400, "early_read": False})
        async with _local_client(late, timeout=10) as local:
            assert (await local.post("/v1/score", json=probe.body)).status_code == 200
            _zero(calls)
            r = await local.post("/v1/score", json=probe.body)
            assert r.status_code == 200 and r.json()["scores"] == answers[0].json()["scores"]
            assert calls == {"begin": 1, "sent": 1, "collected": 1, "plain": 1, "busy_max": 1}, calls

    asyncio.run(run())


def test_auto_collects_reads_sent_ahead_and_never_waits_for_the_pool(exported, store_url, routing_path,
                                                                     monkeypatch) -> None:
    """`auto` execution sends each request's read ahead as inline does and collects it on both paths
    (inline alone, the inference thread under load) instead of reading a second time; requests
    arriving together never hold more reads than the blocking pool has connections (a read that
    would wait for one is not sent ahead: that request reads the usual way), and every answer
    equals the lone request's."""
    from ctrserve.feature_store.blocking import BlockingPool

    calls = _count_blocking_reads(monkeypatch)
    waits: list[int] = []  # checkouts made while every connection was taken (they wait for one)
    checkout = BlockingPool.checkout

    def watched_checkout(self):
        if self.busy >= self.size:
            waits.append(self.busy)
        return checkout(self)

    monkeypatch.setattr(BlockingPool, "checkout", watched_checkout)
    app = _in_process_app(exported, store_url, routing_path, 400, store={"timeout_ms": 400},
                          backend={"execution": "auto"}, pool_size=2)
    probe = probes(exported.prepared)[0]

    async def run() -> None:
        async with _local_client(app, timeout=10) as local:
            first = await local.post("/v1/score", json=probe.body)  # adopts the store version
            assert first.status_code == 200, first.text
            _zero(calls)
            alone = await local.post("/v1/score", json=probe.body)
            assert alone.json()["scores"] == first.json()["scores"]
            assert calls == {"begin": 1, "sent": 1, "collected": 1, "plain": 0, "busy_max": 1}, calls
            _zero(calls)
            together = await asyncio.gather(*(local.post("/v1/score", json=probe.body) for _ in range(8)))
            for r in together:
                assert r.status_code == 200 and r.json()["scores"] == first.json()["scores"], r.text
            # a read that would wait for a connection is not even asked for (the reader checks `saturated`)
            assert 1 <= calls["begin"] == calls["sent"] == calls["collected"] < 8, calls
            assert calls["busy_max"] <= 2 and calls["plain"] == 0, calls
            assert waits == [], "a read sent ahead waited for the pool's connection"
            store = next(iter(app.state.gateway.stores._stores.values()))
            assert store.blocking_reader().pool.busy == 0  # every connection back

    asyncio.run(run())


def test_redis_slow_or_down_gives_503_or_degraded(gateway, degraded_app, redis_server) -> None:
    body = {"user_id": "1", "candidates": [{"item_id": "1"}, {"item_id": "2"}]}

    async def run() -> None:
        async with _local_client(degraded_app) as local, httpx.AsyncClient(base_url=gateway.url, timeout=10) as remote:
            assert (await remote.post("/v1/score", json=body)).status_code == 200
            ok = await local.post("/v1/score", json=body)
            assert ok.status_code == 200 and "flags" not in ok.json()

            async def outage(label: str) -> None:
                t0 = time.perf_counter()
                r = await remote.post("/v1/score", json=body)
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
                assert time.perf_counter() - t0 < 2.0, label
                assert (await remote.get("/readyz")).status_code == 503
                d = await local.post("/v1/score", json=body)
                assert d.status_code == 200 and d.json()["flags"] == {"degraded": True}, d.text
                assert len(d.json()["scores"]) == 2
                assert (await local.get("/readyz")).status_code == 200

            os.kill(redis_server.proc.pid, signal.SIGSTOP)  # slow: no answer at all
            try:
                await outage("redis stalled")
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await asyncio.sleep(0.2)
            assert (await remote.post("/v1/score", json=body)).status_code == 200

            import redis

            with redis.Redis.from_url(redis_server.url) as client:
                client.save()  # keep the data across the restart below
            redis_server.stop()  # down: connection refused
            try:
                await outage("redis stopped")
            finally:
                redis_server.start()
            for _ in range(50):
                r = await remote.post("/v1/score", json=body)
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 200, r.text
            assert "flags" not in (await local.post("/v1/score", json=body)).json()

    asyncio.run(run())
