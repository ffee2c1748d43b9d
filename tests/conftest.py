"""Shared fixtures: a tiny prepared synthetic dataset and batches drawn from it.

Area-specific fixtures live in ``tests/<area>/conftest.py``; fixtures that several areas need
(real redis-server, real tritonserver) live here, each in its own section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    import os

    # keep a 2-core machine usable while tests run beside other work
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared public datasets; tests needing them skip with a clear message if absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data (3,000 rows, sequences of length 12) prepared into a temp dir."""
    from ctrserve.models.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "synthetic"
    prepare("synthetic", SHARED_DATA, out, {"n_rows": 3000, "n_users": 300, "n_items": 200,
                                             "n_cates": 10, "max_len": 12})
    return out


@pytest.fixture(scope="session")
def tiny_fmap(tiny_prepared: Path):
    from ctrserve.contract.feature_map import FeatureMap

    return FeatureMap.load(tiny_prepared / "feature_map.json")


@pytest.fixture()
def tiny_batch(tiny_prepared: Path, tiny_fmap):
    """64 training rows as model inputs, including a user with an empty sequence."""
    import torch

    from ctrserve.contract.prepared import load_split

    arrays = load_split(tiny_prepared, "train")
    seq = tiny_fmap.sequence_fields[0].name
    empty = np.flatnonzero((arrays[seq] == 0).all(axis=1))
    assert empty.size, "the synthetic generator must produce users without history"
    idx = np.r_[empty[:1], np.arange(63)]
    batch = {f.name: torch.from_numpy(arrays[f.name][idx]) for f in tiny_fmap.features}
    labels = torch.from_numpy(arrays[tiny_fmap.label][idx])
    return batch, labels


# --- redis-server fixture (feature store) ---
# A private redis-server per test session on a free port (no persistence: --save "" --appendonly no),
# in a temp dir. Tests that stop it must start it again (RedisServer.start keeps the same port).


class RedisServer:
    """One redis-server process; ``stop()``/``start()``/``restart()`` keep the same port and data dir.
    Data survives a restart only if a test ran ``SAVE`` before stopping (the RDB is read at start)."""

    def __init__(self, binary: str, workdir: Path):
        import socket

        self.binary, self.workdir = binary, workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        import socket
        import subprocess
        import time

        if self.running:
            return
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text() if (self.workdir / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        import subprocess

        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def flushall(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A running private redis-server (session scope); skips when the binary is not on PATH."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found on PATH (install it, e.g. `apt-get install redis-server`)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, running and empty for this test."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url
