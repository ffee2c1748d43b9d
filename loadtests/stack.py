"""The servers a benchmark measures, children of a ``ctrserve.launch.Launcher`` (which stops them
on exit, error, SIGTERM or SIGINT): the gateway as benchmarked and the eager baseline; and the
lean keep-alive client of the sequential latency measurements. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from ctrserve.launch import Child, GatewayServer, Launcher, start_gateway, wait_ready
from ctrserve.net import free_port, http_get


@dataclass(frozen=True)
class GatewaySetup:
    """How the benchmarked gateway runs (checked when made, before anything starts): worker
    processes, execution mode, inference threads per worker; ONNX Runtime with one intra-op and
    one inter-op thread; no access log."""

    workers: int = 1
    pool_threads: int = 2
    execution: str = "auto"
    #: cross-request batching (CTRSERVE_BACKEND_BATCH_MAX_CANDIDATES; 0: off) and its wait in ms
    batch_max_candidates: int = 0
    batch_max_wait_ms: float = 0.2

    def __post_init__(self) -> None:
        from ctrserve.service.settings import BackendSettings

        executions = get_args(BackendSettings.model_fields["execution"].annotation)  # the gateway's own list
        if self.execution not in executions:
            raise ValueError(f"execution must be one of {', '.join(executions)}, got {self.execution!r}")

    def describe(self) -> str:
        pool = "" if self.execution == "inline" else f", {self.pool_threads} inference threads"
        batching = (f", cross-request batching up to {self.batch_max_candidates} candidates / "
                    f"{self.batch_max_wait_ms:g} ms" if self.batch_max_candidates else "")
        return (f"gateway: {self.workers} worker(s), {self.execution} execution, ORT intra-op 1 / inter-op 1"
                f"{pool}{batching}")

    def start(self, launcher: Launcher, repo: Path, redis_url: str, triton_url: str | None = None,
              env: dict[str, str] | None = None, name: str = "gateway") -> GatewayServer:
        """The gateway through its production entry point, ``ctrserve serve --workers N``, ready
        (``env`` adds settings, e.g. the closed loop switched off)."""
        settings = {"CTRSERVE_SERVER_ACCESS_LOG": "false", "CTRSERVE_SERVER_LOG_LEVEL": "warning",
                    "CTRSERVE_BACKEND_POOL_THREADS": str(self.pool_threads),
                    "CTRSERVE_BACKEND_EXECUTION": self.execution,
                    "CTRSERVE_BACKEND_ORT_INTRA_OP_THREADS": "1", "CTRSERVE_BACKEND_ORT_INTER_OP_THREADS": "1",
                    "CTRSERVE_BACKEND_BATCH_MAX_CANDIDATES": str(self.batch_max_candidates),
                    "CTRSERVE_BACKEND_BATCH_MAX_WAIT_MS": f"{self.batch_max_wait_ms:g}", **(env or {})}
        return start_gateway(launcher, repo, redis_url, triton_url=triton_url, env=settings, name=name,
                             args=["--workers", str(max(1, self.workers))], ready_timeout=180)


def gateway_metrics(port: int) -> dict:
    """The gateway's /metrics, parsed."""
    from .stats import parse_prometheus

    status, text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"gateway /metrics answered {status}")
    return parse_prometheus(text.decode())


def start_baseline(launcher: Launcher, run_dir: Path) -> tuple[Child, str]:
    """The eager FastAPI baseline on ``run_dir``, ready: (its child, its URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = launcher.spawn("baseline", [sys.executable, "-m", "uvicorn", "--factory", "--host", "127.0.0.1", "--port",
                                        str(port), "--log-level", "warning", "--no-access-log",
                                        "ctrserve.loadtests.eager_baseline:app_from_env"],
                           env={"CTRSERVE_BASELINE_RUN": str(run_dir)})
    wait_ready(child, lambda: http_get(url + "/healthz")[0] == 200, 180, "the eager baseline", interval=0.2)
    return child, url


class KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client over one loopback socket, for the sequential latency
    measurements: the request bytes are built once per body and the answer is read by its
    Content-Length, so the client's own CPU stays small next to what it measures (far less than
    ``http.client``, which parses every header through the email package)."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._requests: dict[tuple[str, bytes], bytes] = {}

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        request = self._requests.get((path, body))
        if request is None:
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n")
            request = self._requests[(path, body)] = head.encode("latin-1") + body
        try:
            self.sock.sendall(request)
        except OSError as exc:  # reset or broken pipe: the server went away
            raise RuntimeError(f"the server closed the connection ({exc})") from None
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head_lines = buf[:end].split(b"\r\n")
        status = int(head_lines[0].split(b" ", 2)[1])
        lengths = [line.split(b":", 1)[1] for line in head_lines[1:] if line.lower().startswith(b"content-length:")]
        if not lengths:
            raise RuntimeError(f"answer without Content-Length: {buf[:200]!r}")
        total = end + 4 + int(lengths[0])
        while len(buf) < total:
            buf += self._recv()
        return status, buf[end + 4:total]

    def _recv(self) -> bytes:
        try:
            chunk = self.sock.recv(262144)
        except ConnectionError as exc:
            raise RuntimeError(f"the server closed the connection ({exc})") from None
        if not chunk:
            raise RuntimeError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()
