"""Shared fixtures: a tiny prepared synthetic dataset and batches drawn from it.

Area-specific fixtures live in ``tests/<area>/conftest.py``; fixtures that several areas need
(real redis-server, real tritonserver) live here, each in its own section."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ctrserve import launch

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


#: tiny parameters per registered model; the export tests (tests/export) and the learning tests
#: (tests/models/test_learns.py) build every registered model with them; a model without an
#: entry fails test_every_registered_model_has_tiny_params.
SMALL_DEEP = {"embedding_dim": 8, "hidden": [16, 16]}
TINY_PARAMS: dict[str, dict] = {
    "lr": {},
    "fm": {"embedding_dim": 8},
    "dnn": SMALL_DEEP,
    "wide_deep": SMALL_DEEP,
    "deepfm": SMALL_DEEP,
    "dcnv2": {**SMALL_DEEP, "cross_layers": 2},
    "autoint": {"embedding_dim": 8, "attention_layers": 2, "attention_dim": 8, "heads": 2, "hidden": [16]},
    "mgdin": {"embedding_dim": 8, "windows": [2], "model_dim": 8, "layers": 2, "ratios": [0.5, 1.0], "hidden": [16]},
    "dlf": {"embedding_dim": 8, "num_layers": 2, "attention_layers": 1, "rank": 2},
    "cdnet": {"embedding_dim": 8, "k": 4, "num_layers": 1, "heads": 2, "hidden": [16]},
}


@pytest.fixture(scope="session")
def tiny_params() -> dict[str, dict]:
    return TINY_PARAMS


# --- redis-server fixture (feature store) ---
# A private redis-server per test session (``ctrserve.launch.RedisServer``: a free port, no
# persistence, loopback, in a temp dir). Tests that stop it must start it again (``start()``
# keeps the port); data survives a restart only if a test ran ``SAVE`` before stopping.


class RedisServer(launch.RedisServer):
    """The launcher's redis-server, plus ``flushall()`` for tests that need it empty."""

    def flushall(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A running private redis-server (session scope); skips when the binary is not on PATH."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH (install it, e.g. `apt-get install redis-server`)")
    launcher = launch.Launcher(tmp_path_factory.mktemp("redis"), handle_signals=False)  # pytest keeps its own
    server = RedisServer(launcher, data_dir=launcher.workdir)
    server.start()
    yield server
    launcher.close()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, running and empty for this test."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url


# --- tritonserver (nvidia-pytriton) ---
# Every test that needs the local tritonserver is marked ``triton`` and asks for ``triton_install``
# (directly or through ``tritonserver``): without the install they all skip with the same message,
# before any costly fixture runs (session scope comes first); an installed server that fails to
# start fails the test. ``pytest_collection_modifyitems`` keeps the marker and the fixture together.


@pytest.fixture(scope="session")
def triton_install():
    """The local tritonserver from nvidia-pytriton; skips the test with the reason when absent."""
    from ctrserve.export import triton_local

    try:
        return triton_local.find_install()
    except triton_local.TritonError as exc:
        pytest.skip(str(exc))


@pytest.fixture()
def tritonserver(triton_install) -> Iterator[Callable[..., object]]:
    """``start(model_repo, **kw)`` -> a running local TritonServer, stopped after the test."""
    from ctrserve.export import triton_local

    servers = []

    def start(model_repo: Path, **kw):
        server = triton_local.start(model_repo, **kw)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [item.nodeid for item in items
             if (item.get_closest_marker("triton") is None) == ("triton_install" in getattr(item, "fixturenames", ()))]
    if wrong:
        raise pytest.UsageError("tests marked `triton` take the `triton_install` fixture (tests/conftest.py) and "
                                f"only they do: {wrong}")
