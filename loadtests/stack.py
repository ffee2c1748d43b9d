"""Processes of a benchmark run: redis-server, the gateway (or the eager baseline), Locust.

``Stack`` is a thin user of ``ctrserve.launch.Launcher``: every child runs in its own process
group with PDEATHSIG set (it gets SIGTERM if the runner dies, even by SIGKILL), and all of them
are stopped on exit, error, SIGTERM or SIGINT: SIGTERM to the groups, SIGKILL after a grace
period. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrserve.launch import Child, Launcher, start_gateway, start_redis, wait_ready
from ctrserve.launch import child_setup as _child_setup
from ctrserve.net import free_port, http_get

__all__ = ["free_port", "http_get"]  # re-exported: the benchmark modules import them from here

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


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


@dataclass
class Stack:
    """Owns the child processes of one run (through a ``Launcher``); a context manager that always
    cleans up."""

    workdir: Path
    launcher: Launcher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.launcher = Launcher(self.workdir)

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for c in self.launcher.children]

    def __enter__(self) -> Stack:
        self.launcher.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.launcher.__exit__(*exc)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None,
              ) -> subprocess.Popen:
        return self.launcher.spawn(name, cmd, env=env, log=log, cwd=self.workdir).proc

    def stop(self, proc: subprocess.Popen, grace: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds."""
        for child in self.launcher.children:
            if child.proc is proc:
                return self.launcher.stop(child, grace)
        return proc.poll()

    def stop_all(self) -> None:
        self.launcher.stop_all()

    # -- the pieces ----------------------------------------------------------------------
    def redis(self) -> str:
        return start_redis(self.launcher, timeout=15).url

    def gateway(self, repo: Path, redis_url: str, port: int, workers: int = 1, pool_threads: int = 2,
                intra_op_threads: int = 1, routing: Path | None = None, triton_url: str | None = None,
                access_log: bool = False, timeout: float = 180, name: str = "gateway",
                execution: str = "auto") -> subprocess.Popen:
        """The scoring gateway through its production entry point, ``ctrserve serve --workers N``."""
        env = {"CTRSERVE_SERVER_ACCESS_LOG": str(access_log).lower(), "CTRSERVE_SERVER_LOG_LEVEL": "warning",
               "CTRSERVE_BACKEND_POOL_THREADS": str(pool_threads), "CTRSERVE_BACKEND_EXECUTION": execution,
               "CTRSERVE_BACKEND_ORT_INTRA_OP_THREADS": str(intra_op_threads),
               "CTRSERVE_BACKEND_ORT_INTER_OP_THREADS": "1"}
        return start_gateway(self.launcher, repo, redis_url, port=port, routing=routing, triton_url=triton_url,
                             env=env, args=["--workers", str(max(1, workers))], name=name,
                             ready_timeout=timeout).proc

    def baseline(self, run_dir: Path, port: int, timeout: float = 180) -> subprocess.Popen:
        proc = self.spawn("baseline", [sys.executable, "-m", "ctrserve.loadtests.eager_baseline", "--run",
                                       str(run_dir), "--port", str(port)])
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout, "the eager baseline",
                 proc, self.workdir / "baseline.log")
        return proc


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    """``ctrserve.launch.wait_ready`` for a bare ``Popen``: fails at once when it exits (with the
    tail of ``log``), else after ``timeout`` seconds."""
    child = Child(what, proc, log or Path(os.devnull)) if proc is not None else None
    wait_ready(child, check, timeout, what, interval=0.2)


# -- Locust ----------------------------------------------------------------------------------
@dataclass
class LocustRun:
    returncode: int
    wall_s: float
    #: CPU seconds of the Locust process / wall seconds (1.0 = one core busy)
    cpu_cores: float
    #: the whole machine's CPU utilisation during the run (0..1 of all cores)
    machine_util: float
    #: CPU cores used by other watched processes (e.g. the gateway), by name
    others_cores: dict[str, float]
    csv_prefix: Path
    samples: Path
    log: Path


def _cpu_seconds(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(Exception):  # psutil.NoSuchProcess etc.
            t = p.cpu_times()
            total += t.user + t.system
            for c in p.children(recursive=True):
                with contextlib.suppress(Exception):
                    ct = c.cpu_times()
                    total += ct.user + ct.system
    return total


def run_locust(stack: Stack, host: str, users: int, duration_s: float, name: str, pool: Path,
               candidates: str, mode: str = "gateway", target_rps: float = 0.0, spawn_rate: float | None = None,
               zipf: float = 1.1, seed: int = 0, watch: dict[str, subprocess.Popen] | None = None) -> LocustRun:
    """Run Locust headless for ``duration_s`` and wait for it (bounded: duration + 60 s)."""
    import psutil

    out = stack.workdir / name
    out.mkdir(parents=True, exist_ok=True)
    prefix, samples, log = out / "locust", out / "samples.npz", out / "locust.log"
    samples.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r",
           str(spawn_rate or users), "-t", f"{max(1, round(duration_s))}s", "--host", host, "--csv", str(prefix),
           "--csv-full-history", "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "10",
           "--pool", str(pool), "--candidates", candidates, "--mode", mode, "--target-rps", str(target_rps),
           "--zipf", str(zipf), "--traffic-seed", str(seed), "--samples-out", str(samples)]
    watched = {k: psutil.Process(p.pid) for k, p in (watch or {}).items() if p.poll() is None}
    before = {k: _cpu_seconds([p]) for k, p in watched.items()}
    psutil.cpu_percent(None)
    t0 = time.monotonic()
    proc = stack.spawn(f"locust-{name}", cmd, log=log)
    me = psutil.Process(proc.pid)
    cpu = 0.0
    try:
        while proc.poll() is None:
            cpu = max(cpu, _cpu_seconds([me]))  # last reading before exit
            if time.monotonic() - t0 > duration_s + 60:
                raise RuntimeError(f"locust ({name}) did not stop within {duration_s + 60:.0f} s")
            time.sleep(0.2)
    finally:
        stack.stop(proc)
    wall = time.monotonic() - t0
    util = psutil.cpu_percent(None) / 100
    others = {k: (_cpu_seconds([p]) - before[k]) / wall for k, p in watched.items()}
    if not samples.exists():
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"locust ({name}) wrote no samples (exit code {proc.returncode}); log tail:\n{tail}")
    return LocustRun(proc.returncode or 0, wall, cpu / wall, util, others, prefix, samples, log)


@contextlib.contextmanager
def py_spy(pid: int, out: Path, duration_s: float, rate: int = 100) -> Iterator[Path | None]:
    """Sample ``pid`` (and its subprocesses) with py-spy into collapsed stacks, if py-spy is installed."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        yield None
        return
    proc = subprocess.Popen([binary, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate",
                             str(rate), "--format", "raw", "--duration", str(max(1, round(duration_s))), "--output",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_child_setup)
    try:
        yield out
    finally:
        try:
            proc.wait(duration_s + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
