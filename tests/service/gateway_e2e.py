"""Real processes for the gateway's end-to-end tests: a trained and exported model, a gateway
subprocess (``python -m ctrserve serve``) reached over a TCP socket, reference scores from the
PyTorch model on the same rows (and the parity check against them), and an in-process gateway on
the same Redis, models and routing."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from ctrserve.launch import Launcher, start_gateway

ROUTING_E2E = """
experiments:
  - name: main
    salt: e2e-2026
    arms:
      - {name: control, model: ctr, version: 1, weight: 70}
      - {name: treatment, model: ctr, version: 2, weight: 30}
"""
ADMIN_TOKEN = "e2e-admin"


@dataclass
class Exported:
    repo: Path
    prepared: Path
    runs: dict[int, Path]  # version -> run dir


def train_and_export(prepared: Path, work: Path) -> Exported:
    """Two small DeepFM runs (seeds 1 and 2, one epoch) exported as ``ctr`` versions 1 and 2."""
    from ctrserve.export.exporter import export_run
    from ctrserve.export.triton_repo import RepoOptions
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train

    repo = work / "model_repository"
    runs = {}
    for version, seed in ((1, 1), (2, 2)):
        cfg = resolve_config("deepfm", "synthetic", seed=seed, variant="gateway-e2e", overrides={
            "train": {"max_epochs": 1, "batch_size": 256, "threads": 1},
            "model": {"embedding_dim": 8, "hidden": [16, 16]}})
        run = train(cfg, prepared, work / "runs", progress=False).run_dir
        export_run(run, "onnx", repo, name="ctr", version=version, options=RepoOptions(version_policy="all"))
        runs[version] = run
    return Exported(repo, prepared, runs)


class GatewayProcess:
    """``ctrserve serve`` in a subprocess on a free port (``ctrserve.launch.start_gateway``, not yet
    waited for: call ``wait_ready``); ``env`` adds CTRSERVE_* settings, ``args`` command-line options."""

    def __init__(self, repo: Path, redis_url: str, log: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None):
        self.log_path = log
        # generous store budgets: the test machine's 2 cores are shared, and a 50 ms Redis read
        # budget is a production setting, not a property under test (outages use SIGSTOP/stop)
        settings = {"OMP_NUM_THREADS": "1", "CTRSERVE_SERVER_ACCESS_LOG": "false", "CTRSERVE_REDIS_TIMEOUT_MS": "1000",
                    "CTRSERVE_STORE_TIMEOUT_MS": "500", **(env or {})}
        self.launcher = Launcher(log.parent, handle_signals=False)  # pytest handles its own signals
        self.server = start_gateway(self.launcher, repo, redis_url, env=settings, args=args or [], log=log,
                                    ready_timeout=None)
        self.port, self.url, self.proc = self.server.port, self.server.url, self.server.proc

    def wait_ready(self, timeout: float = 60) -> None:
        self.server.wait_ready(timeout)

    def log_tail(self, n: int = 30) -> str:
        return self.server.child.log_tail(n)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.launcher.stop(self.server.child, grace=timeout, sig=sig)
        return self.proc.returncode


# -- reference scores from the PyTorch model -----------------------------------------------------
@dataclass
class Probe:
    """One request built from held-out rows of a single user, with its PyTorch reference scores."""

    body: dict
    rows: np.ndarray


def probes(prepared: Path, n_users: int = 6, max_candidates: int = 24) -> list[Probe]:
    """Test rows grouped by user, as requests with raw ids; each candidate carries its row's
    context (device, hour) as a per-candidate override, so every row's own features are scored."""
    import json

    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.contract.prepared import load_split

    fmap = FeatureMap.load(prepared / "feature_map.json")
    vocab = json.loads((prepared / "vocab.json").read_text())
    arrays = load_split(prepared, "test")
    context = [f.name for f in fmap.features if f.side == "context"]

    def raw(feature: str, ids: np.ndarray) -> list[str]:
        table = fmap.feature(feature).embedding or feature
        return [vocab[table][int(i) - 2] for i in ids]

    ok = (arrays["user_id"] >= 2) & (arrays["item_id"] >= 2)  # raw ids recoverable (not PAD/OOV)
    for c in context:
        ok &= arrays[c] >= 2
    users, counts = np.unique(arrays["user_id"][ok], return_counts=True)
    out = []
    for u in users[np.argsort(-counts, kind="stable")][:n_users]:
        rows = np.flatnonzero(ok & (arrays["user_id"] == u))[:max_candidates]
        ctx = {c: raw(c, arrays[c][rows]) for c in context}
        cands = [{"item_id": item, "features": {c: ctx[c][k] for c in context}}
                 for k, item in enumerate(raw("item_id", arrays["item_id"][rows]))]
        out.append(Probe({"user_id": raw("user_id", arrays["user_id"][rows[:1]])[0], "candidates": cands}, rows))
    return out


def reference_scores(run_dir: Path, prepared: Path, rows: np.ndarray) -> np.ndarray:
    """sigmoid(model(batch)) of the trained PyTorch model on the prepared rows."""
    import torch

    from ctrserve.contract.prepared import load_split
    from ctrserve.models.train.trainer import load_run

    _, fmap, model = load_run(run_dir)
    arrays = load_split(prepared, "test")
    batch = {f.name: torch.from_numpy(arrays[f.name][rows]) for f in fmap.features}
    with torch.no_grad():
        return torch.sigmoid(model(batch)).numpy().astype(np.float64)


def check_parity(url: str, exported, arm: str | None, label: str) -> float:
    """Every probe scored by the gateway at ``url`` (on ``arm`` if given) within 1e-4 of PyTorch;
    returns the largest difference."""
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


# -- an in-process gateway ---------------------------------------------------------------------
def in_process_app(exported, store_url: str, routing_path: Path, redis_timeout_ms: float,
                    store: dict | None = None, backend: dict | None = None, **redis: object):
    """An in-process gateway on the tests' Redis, models and routing (``store`` / ``backend``:
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
async def local_client(app, timeout: float = 5.0) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the in-process ``app``, its lifespan running and the app ready to score."""
    from ctrserve.service.app import wait_ready

    async with app.router.lifespan_context(app):
        await wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=timeout) as local:
            yield local
