"""What the serving benchmarks run on: the benchmark model (trained, calibrated and exported once,
then reused), its dataset bulk-loaded into a private Redis, a traffic pool drawn from what was
loaded, and one fixed request assembled by the gateway's own code from the store.

The gateway is used only through public names: ``Assembler.from_dir(version_dir).assemble``, the
feature store's ``RedisOnlineStore(...).online_read`` and the execution modes of its settings.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .traffic import Pool

#: the benchmark dataset: synthetic, user sequence L = 600; tiny, the benchmark measures latency
BENCH_DATA = {"max_len": 600, "n_rows": 20000, "n_users": 2000, "n_items": 5000}
BENCH_TRAIN = {"train": {"max_epochs": 1}}
BENCH_SEED = 2026


def bench_dir() -> Path:
    from ctrserve.paths import settings

    return settings().work_dir / "bench"


# -- model -----------------------------------------------------------------------------------
def ensure_run(model: str = "mgdin") -> Path:
    """The newest finished benchmark run of ``model`` on the benchmark data, trained if absent.

    A model with calibrated masks (MGDIN) is benchmarked as it ships: the static-mask run that
    ``ctrserve calibrate`` writes beside the trained one (no A0, no top-k in the graph)."""
    from ctrserve.models.cli import ensure_prepared
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train
    from ctrserve.paths import settings

    prepared = ensure_prepared("synthetic", BENCH_DATA)
    runs_dir = settings().runs_dir
    run = _newest_bench_run(runs_dir / "synthetic" / model, prepared)
    if run is None:
        cfg = resolve_config(model, "synthetic", overrides=BENCH_TRAIN, seed=BENCH_SEED, variant="bench")
        run = train(cfg, prepared, runs_dir, command="ctrserve bench", progress=False).run_dir
    return _static_masks_of(run) if model == "mgdin" else run


def _newest_bench_run(model_dir: Path, prepared: Path) -> Path | None:
    for run in sorted(model_dir.glob("bench-s*"), reverse=True):
        marker = run / "prepared_dir.txt"
        if ((run / "model.pt").exists() and (run / "metrics.json").exists() and marker.exists()
                and Path(marker.read_text().strip()).resolve() == prepared.resolve()):
            return run
    return None


def _static_masks_of(run: Path) -> Path:
    """The static-mask run calibrated from ``run`` (made once, then reused)."""
    from ctrserve.models.calibrate import calibrate_run

    for cal in sorted(run.parent.glob("static_masks-s*/calibration.json"), reverse=True):
        if Path(json.loads(cal.read_text())["source_run"]).resolve() == run.resolve():
            return cal.parent
    return calibrate_run(run, command="ctrserve bench (ensure_run)")[0]


def ensure_export(run_dir: Path, repo: Path, name: str, version: int = 1, grouped: bool = False) -> Path:
    """Version ``version`` of ``name`` in ``repo`` exported (ONNX, parity-gated) from ``run_dir``;
    ``grouped``: with the multi-user graph too (``ctrserve export --grouped``)."""
    from ctrserve.contract.manifest import Manifest
    from ctrserve.export.exporter import export_run

    version_dir = repo / name / str(version)
    if (version_dir / "manifest.json").exists() and (version_dir / "model.onnx").exists():
        manifest = Manifest.load(version_dir)
        same_run = Path(manifest.run_dir).resolve() == Path(run_dir).resolve()
        if same_run and (not grouped or manifest.grouped is not None) and not _sources_newer_than(
                version_dir / "model.onnx"):
            return version_dir
    export_run(run_dir, "onnx", repo, name=name, version=version, force=True, grouped=grouped)
    return version_dir


def _sources_newer_than(path: Path) -> bool:
    """True when model or exporter code changed after ``path`` was written: the same run would
    export to another graph, and a cached one would measure the old code."""
    from ctrserve.paths import REPO_ROOT

    written = path.stat().st_mtime
    return any(p.stat().st_mtime > written for d in ("models", "export") for p in (REPO_ROOT / d).rglob("*.py"))


def prepared_of(run_dir: Path) -> Path:
    return Path((Path(run_dir) / "prepared_dir.txt").read_text().strip())


def build_requests(manifest: Any, prepared: Path, batches: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """One user's tensors (the first test row with a non-empty history) and B candidates (test rows)."""
    from ctrserve.contract.prepared import load_split

    arrays = load_split(prepared, "test")
    seq = [f.name for f in manifest.feature_map.sequence_fields]
    row = int(np.flatnonzero((arrays[seq[0]] != 0).any(axis=1))[0]) if seq else 0
    n = len(arrays[manifest.candidate_inputs[0].name])
    out = {}
    for b in batches:
        idx = np.arange(b) % n
        out[b] = {t.name: np.ascontiguousarray(arrays[t.name][[row]] if t.side == "user" else arrays[t.name][idx])
                  for t in manifest.inputs}
    return out


# -- store and traffic pool ------------------------------------------------------------------
@asynccontextmanager
async def gateway_reader(version_dir: Path, redis_url: str, namespace: str, timeout_ms: int = 1000,
                         ) -> AsyncIterator[tuple[Any, Any]]:
    """(the gateway's assembler, a store as the gateway reads it: item cache on) for ``version_dir``."""
    from ctrserve.contract.manifest import Manifest
    from ctrserve.contract.store_schema import StoreSchema
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.redis_store import RedisOnlineStore
    from ctrserve.service.assemble import Assembler

    schema = StoreSchema.from_feature_map(Manifest.load(version_dir).feature_map)
    async with RedisOnlineStore(schema, RedisStoreConfig(url=redis_url, timeout_ms=timeout_ms), namespace) as store:
        yield Assembler.from_dir(version_dir), store


def _contexts(prepared: Path, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Raw context values (e.g. device, hour) of ``n`` random test rows."""
    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.contract.prepared import load_split

    fmap = FeatureMap.load(prepared / "feature_map.json")
    vocab = json.loads((prepared / "vocab.json").read_text())
    test = load_split(prepared, "test")
    feats = [f for f in fmap.features if f.side == "context" and f.kind == "sparse"]
    out = []
    for r in rng.integers(0, len(test[fmap.label]), n):
        codes = [(f, int(test[f.name][r])) for f in feats]
        out.append({f.name: vocab[f.embedding or f.name][code - 2] for f, code in codes if code >= 2})
    return out


async def _encode(version_dir: Path, redis_url: str, namespace: str, pool: Pool) -> None:
    """Fill the pool's encoded features (baseline mode) through the gateway's own assembly code."""
    from ctrserve.contract.manifest import Manifest

    manifest = Manifest.load(version_dir)
    fmap = manifest.feature_map
    user_side = [t.name for t in manifest.user_inputs]
    item_side = [t.name for t in manifest.candidate_inputs if fmap.feature(t.name).side == "item"]
    ctx_side = [t.name for t in manifest.candidate_inputs if fmap.feature(t.name).side != "item"]
    async with gateway_reader(version_dir, redis_url, namespace, timeout_ms=5000) as (assembler, store):
        one = pool.items[:1]
        users, contexts = [], []
        for u, ctx in zip(pool.users, pool.contexts, strict=True):
            arrays = assembler.assemble(u, one, await store.online_read(u, one), ctx)
            users.append({n: arrays[n].reshape(-1).tolist() for n in user_side})
            contexts.append({n: arrays[n][0].item() for n in ctx_side})
        cols: dict[str, list] = {n: [] for n in item_side}
        for start in range(0, len(pool.items), 1000):
            chunk = pool.items[start:start + 1000]
            arrays = assembler.assemble(pool.users[0], chunk, await store.online_read(pool.users[0], chunk))
            for n in item_side:
                cols[n] += arrays[n].tolist()
    pool.encoded_users, pool.encoded_items, pool.encoded_contexts = users, cols, contexts


def build_pool(run_dir: Path, version_dir: Path, redis_url: str, n_users: int = 1000, baseline: bool = False,
               seed: int = 0) -> Pool:
    """Bulk-load the run's prepared dataset into Redis and draw the traffic pool from what was loaded."""
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.loader import load_prepared

    prepared = prepared_of(run_dir)
    _, rec = asyncio.run(load_prepared(prepared, RedisStoreConfig(url=redis_url, cleanup_grace_s=0)))
    rng = np.random.default_rng(seed)
    ids = list(rec.users.ids)
    users = [ids[i] for i in rng.permutation(len(ids))[:n_users]]  # Zipf rank = position in this list
    pool = Pool(users=users, items=list(rec.items.ids), contexts=_contexts(prepared, len(users), rng))
    if baseline:
        asyncio.run(_encode(version_dir, redis_url, prepared.name, pool))
    return pool


# -- the fixed request -----------------------------------------------------------------------
@dataclass
class FixedRequest:
    """One request (a user, its first B candidates) as the gateway would assemble it from the store."""

    inputs: dict[int, dict[str, np.ndarray]]  # B -> the model's named inputs
    fetch_ms: list[float]  # in-process store reads of the B = 100 request
    assembly_ms: list[float]  # in-process assembly of the same


async def assemble_request(version_dir: Path, redis_url: str, namespace: str, user: str, items: list[str],
                           context: dict[str, Any], batches: list[int], reps: int) -> FixedRequest:
    """Inputs per B (the gateway's store read + assembly), and in-process timings of both at B = 100."""
    async with gateway_reader(version_dir, redis_url, namespace) as (assembler, store):
        inputs = {}
        for b in batches:
            stored = await store.online_read(user, items[:b])
            if stored.user_missing or len(stored.missing_items):
                raise RuntimeError(f"benchmark request: user {user} or {len(stored.missing_items)} items not in "
                                   "the store")
            inputs[b] = assembler.assemble(user, items[:b], stored, context)
        fetch, assembly = [], []
        b = 100 if 100 in batches else batches[0]
        for _ in range(reps):
            t0 = time.perf_counter()
            stored = await store.online_read(user, items[:b])
            t1 = time.perf_counter()
            assembler.assemble(user, items[:b], stored, context)
            fetch.append((t1 - t0) * 1e3)
            assembly.append((time.perf_counter() - t1) * 1e3)
    return FixedRequest(inputs, fetch, assembly)
