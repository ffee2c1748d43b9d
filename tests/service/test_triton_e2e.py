"""End to end on the local tritonserver: the gateway subprocess scores like PyTorch through Triton,
answers 504 while Triton stalls and recovers, and drains in-flight requests on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from gateway_e2e import GatewayProcess, check_parity

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


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
        check_parity(triton_gateway.url, exported, arm, f"triton {arm}")


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

