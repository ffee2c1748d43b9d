"""The launcher's real-process cases on the gateway tests' exported model:

- a gateway started on a repository of two models without a routing config fails at once with
  the gateway's reason (it used to be polled until the 120 s timeout), and the same repository
  with a routing config becomes ready;
- gateways started with either body decoder (``CTRSERVE_API_DECODER``) answer the same over HTTP;
- ``ctrserve triton`` binds HTTP, gRPC and metrics to loopback unless ``--host`` says otherwise,
  and stops on SIGTERM to its pid within 10 s, its tritonserver with it."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctrserve.launch import GatewayConfigError, Launcher, start_gateway
from ctrserve.net import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_model_repo(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("two_models") / "model_repository"
    shutil.copytree(exported.repo / "ctr", repo / "ctr")
    shutil.copytree(exported.repo / "ctr", repo / "other")
    return repo


def test_gateway_without_routing_on_two_models_fails_at_once(two_model_repo: Path, store_url: str,
                                                             tmp_path: Path) -> None:
    with Launcher(tmp_path) as launcher:
        t0 = time.monotonic()
        with pytest.raises(GatewayConfigError, match=r"no routing config given .* holds models \['ctr', 'other'\]"):
            start_gateway(launcher, two_model_repo, store_url, ready_timeout=120)
        assert time.monotonic() - t0 < 60, "polled like a gateway still loading models"
        assert not launcher.children  # the failed gateway is stopped

        routing = tmp_path / "routing.yaml"
        routing.write_text("experiments: [{name: main, salt: s, arms: [{name: a, model: ctr, version: 1, "
                           "weight: 100}]}]\n")
        gateway = start_gateway(launcher, two_model_repo, store_url, routing=routing, ready_timeout=120)
        assert gateway.url.startswith("http://127.0.0.1:")


def test_both_body_decoders_answer_alike_over_http(exported, store_url: str, tmp_path: Path) -> None:
    import httpx
    from gateway_e2e import probes

    from ctrserve.service.request import fast_decode

    body = probes(exported.prepared)[0].body
    bodies = [body, {**body, "request_id": "r-1"}, {**body, "model": "ctr:1"}, {**body, "candidates": [{"item_id": 5}]},
              {**body, "extra": 1}, {**body, "context": {"nope": 1}}, {**body, "user_id": ""}, {**body, "model": "x"}]
    raw = [httpx.Request("POST", "/", json=b).content for b in bodies]
    assert all(fast_decode(r) is not None for r in raw[:3])  # the valid ones take the msgspec path
    routing = tmp_path / "routing.yaml"
    routing.write_text("experiments: [{name: main, salt: s, arms: [{name: a, model: ctr, version: 1, weight: 100}]}]\n")
    answers = {}
    with Launcher(tmp_path) as launcher:
        for decoder in ("msgspec", "pydantic"):
            gw = start_gateway(launcher, exported.repo, store_url, routing=routing, name=f"gateway-{decoder}",
                               env={"CTRSERVE_API_DECODER": decoder}, ready_timeout=120)
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                answers[decoder] = [
                    (r.status_code, r.json()) for r in (client.post("/v1/score", content=b, headers={
                        "content-type": "application/json", "x-request-id": f"r{i}"}) for i, b in enumerate(raw))]
    assert answers["msgspec"] == answers["pydantic"]
    assert [status for status, _ in answers["msgspec"]] == [200, 200, 200, 200, 422, 422, 422, 404]


def _listening(pid: int) -> dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """port -> address of the listening sockets of ``pid`` (IPv4-mapped IPv6 addresses as IPv4:
    gRPC listens on ``::ffff:127.0.0.1`` for 127.0.0.1)."""
    import psutil

    out = {}
    for c in psutil.Process(pid).net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
            ip = ipaddress.ip_address(c.laddr.ip)
            out[c.laddr.port] = getattr(ip, "ipv4_mapped", None) or ip
    return out


@pytest.mark.triton
@pytest.mark.parametrize("host", [None, "0.0.0.0"], ids=["default", "host-all"])
def test_triton_cli_binds_loopback_and_stops_on_sigterm(triton_install, exported, host: str | None,
                                                        tmp_path: Path) -> None:
    import psutil

    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "ctrserve", "triton", "--model-repo", str(exported.repo), "--http-port",
           str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--log-file",
           str(tmp_path / "t.log"), *(["--host", host] if host else [])]
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**os.environ, "COLUMNS": "200"})
    try:
        out = ""
        while "log:" not in out:  # the last line of the ready banner
            line = cli.stdout.readline()
            assert line or cli.poll() is None, out
            out += line
        assert "tritonserver ready" in out, out
        (server,) = [p for p in psutil.Process(cli.pid).children() if p.name() == "tritonserver"]
        listening = _listening(server.pid)
        assert set(ports) <= set(listening), listening
        if host is None:  # HTTP, gRPC and metrics on loopback only
            assert all(listening[p].is_loopback for p in ports), listening
        else:  # every interface (gRPC takes the IPv6 wildcard, dual-stack)
            assert all(listening[p].is_unspecified for p in ports), listening
        t0 = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        rest, _ = cli.communicate(timeout=10)
        assert time.monotonic() - t0 < 10
        assert cli.returncode == 0 and "stopped (exit code 0)" in rest, out + rest
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
