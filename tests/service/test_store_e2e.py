"""The gateway's feature-store reads on the real Redis: thread, inline and auto execution answer alike,
reads sent ahead are collected and never leak, and a slow or stopped Redis gives 503 or degraded scores."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from gateway_e2e import in_process_app, local_client, probes

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


def _zero(calls: dict[str, int]) -> None:
    """Every count back to 0."""
    calls.update(dict.fromkeys(calls, 0))


@pytest.fixture()
def degraded_app(exported, store_url, routing_path):
    """An in-process gateway in degrade mode on the same Redis, model and routing."""
    return in_process_app(exported, store_url, routing_path, 1000, store={"failure": "degrade", "timeout_ms": 300})


def test_thread_and_inline_execution_give_the_same_answers(gateway, exported, store_url, routing_path) -> None:
    """The subprocess gateway runs the default execution, `auto`, whose lone requests (these probes,
    one at a time) run inline (blocking Redis read, inference on the event loop); an in-process
    gateway in thread mode (awaited read, inference on its worker thread) on the same Redis, models
    and routing answers every probe identically."""

    app = in_process_app(exported, store_url, routing_path, 100, backend={"execution": "thread"})
    assert httpx.get(gateway.url + "/readyz", timeout=10).status_code == 200

    async def run() -> None:
        async with local_client(app) as local, httpx.AsyncClient(base_url=gateway.url, timeout=10) as remote:
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
    app = in_process_app(exported, store_url, routing_path, 400, store={"timeout_ms": 400}, pool_size=1)
    probe = probes(exported.prepared)[0]
    answers: list[httpx.Response] = []

    async def run() -> None:
        async with local_client(app, timeout=10) as local:
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
        late = in_process_app(exported, store_url, routing_path, 400, store={"timeout_ms": 400, "early_read": False})
        async with local_client(late, timeout=10) as local:
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
    app = in_process_app(exported, store_url, routing_path, 400, store={"timeout_ms": 400},
                          backend={"execution": "auto"}, pool_size=2)
    probe = probes(exported.prepared)[0]

    async def run() -> None:
        async with local_client(app, timeout=10) as local:
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
        async with local_client(degraded_app) as local, httpx.AsyncClient(base_url=gateway.url, timeout=10) as remote:
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
