"""Real processes for the gateway's end-to-end tests: a trained and exported model, a gateway
subprocess (``python -m ctrserve serve``) reached over a TCP socket, and reference scores from the
PyTorch model on the same rows."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

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
