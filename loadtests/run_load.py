"""``ctrserve bench load``: the whole serving stack under Locust, headless, bounded in time.

Steps: a trained run (reused, or a tiny MGDIN trained on synthetic data with L = 600) -> ONNX
export -> private redis-server, bulk-loaded -> a traffic pool (users, items, contexts) from the
loaded store -> the gateway (subprocess, configured workers; embedded ONNX Runtime, or the local
Triton binary) -> a Locust warm-up run (discarded) -> the measured Locust run -> CSV stats, a
summary (p50/p95/p99/max, requests/s, candidates/s, error rate, CPU of the load generator and
of the gateway) and plots (latency over time, histogram). Every child is stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args

import numpy as np
import typer

from .stats import Summary, load_samples, summarize
from .traffic import CandidateDist, Pool

SECTION = "load"
#: the benchmark dataset: synthetic, user sequence L = 600; tiny, the benchmark measures latency
BENCH_DATA = {"max_len": 600, "n_rows": 20000, "n_users": 2000, "n_items": 5000}
BENCH_TRAIN = {"train": {"max_epochs": 1}}


def bench_dir() -> Path:
    from ctrserve.paths import settings

    return settings().work_dir / "bench"


# -- model -----------------------------------------------------------------------------------
def ensure_run(model: str = "mgdin", retrain: bool = False, seed: int = 2026) -> Path:
    """The newest finished benchmark run of ``model`` on the benchmark data, trained if absent.

    A model with calibrated masks (MGDIN) is benchmarked as it ships: the static-mask run that
    ``ctrserve calibrate`` writes beside the trained one (no A0, no top-k in the graph)."""
    from ctrserve.models.cli import ensure_prepared
    from ctrserve.models.train.config import resolve_config
    from ctrserve.models.train.trainer import train
    from ctrserve.paths import settings

    prepared = ensure_prepared("synthetic", BENCH_DATA)
    runs_dir = settings().runs_dir
    run = None if retrain else _newest_bench_run(runs_dir / "synthetic" / model, prepared)
    if run is None:
        cfg = resolve_config(model, "synthetic", overrides=BENCH_TRAIN, seed=seed, variant="bench")
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


def ensure_export(run_dir: Path, repo: Path, name: str, version: int = 1) -> Path:
    """Version ``version`` of ``name`` in ``repo`` exported (ONNX, parity-gated) from ``run_dir``."""
    from ctrserve.contract.manifest import Manifest
    from ctrserve.export.exporter import export_run

    version_dir = repo / name / str(version)
    if ((version_dir / "manifest.json").exists() and (version_dir / "model.onnx").exists()
            and Path(Manifest.load(version_dir).run_dir).resolve() == Path(run_dir).resolve()
            and not _sources_newer_than(version_dir / "model.onnx")):
        return version_dir
    export_run(run_dir, "onnx", repo, name=name, version=version, force=True)
    return version_dir


def _sources_newer_than(path: Path) -> bool:
    """True when model or exporter code changed after ``path`` was written: the same run would
    export to another graph, and a cached one would measure the old code."""
    from ctrserve.paths import REPO_ROOT

    written = path.stat().st_mtime
    return any(p.stat().st_mtime > written for d in ("models", "export") for p in (REPO_ROOT / d).rglob("*.py"))


def prepared_of(run_dir: Path) -> Path:
    return Path((Path(run_dir) / "prepared_dir.txt").read_text().strip())


# -- traffic pool ----------------------------------------------------------------------------
def _contexts(prepared: Path, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Raw context values (e.g. device, hour) of ``n`` random test rows."""
    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.contract.prepared import load_split

    fmap = FeatureMap.load(prepared / "feature_map.json")
    vocab = json.loads((prepared / "vocab.json").read_text())
    test = load_split(prepared, "test")
    feats = [f for f in fmap.features if f.side == "context" and f.kind == "sparse"]
    rows = rng.integers(0, len(test[fmap.label]), n)
    out = []
    for r in rows:
        ctx = {}
        for f in feats:
            code = int(test[f.name][r])
            if code >= 2:
                ctx[f.name] = vocab[f.embedding or f.name][code - 2]
        out.append(ctx)
    return out


async def _encode(version_dir: Path, redis_url: str, namespace: str, pool: Pool) -> None:
    """Fill the pool's encoded features (baseline mode) through the gateway's own assembly code."""
    from ctrserve.contract.manifest import Manifest
    from ctrserve.contract.store_schema import StoreSchema
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.redis_store import RedisOnlineStore
    from ctrserve.service.assemble import Assembler

    manifest = Manifest.load(version_dir)
    assembler = Assembler.from_dir(version_dir)
    schema = StoreSchema.from_feature_map(manifest.feature_map)
    fmap = manifest.feature_map
    user_side = [t.name for t in manifest.user_inputs]
    item_side = [t.name for t in manifest.candidate_inputs if fmap.feature(t.name).side == "item"]
    ctx_side = [t.name for t in manifest.candidate_inputs if fmap.feature(t.name).side != "item"]
    async with RedisOnlineStore(schema, RedisStoreConfig(url=redis_url, timeout_ms=5000), namespace) as store:
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


# -- plots -----------------------------------------------------------------------------------
def plot_run(samples: dict[str, np.ndarray], out: Path, title: str) -> Path:
    """Latency over time (p50/p95/p99 per second, requests/s) and a latency histogram, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, ms, ok = samples["t"], samples["ms"], samples["ok"].astype(bool)
    sec = np.floor(t - t.min()).astype(int)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = np.unique(sec)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ax1.plot(xs, [np.percentile(ms[sec == s], q) for s in xs], style, label=f"p{q}")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left")
    rate = ax1.twinx()
    rate.plot(xs, [int((sec == s).sum()) for s in xs], color="grey", alpha=0.5, label="requests/s")
    if (~ok).any():
        rate.plot(xs, [int(((sec == s) & ~ok).sum()) for s in xs], color="red", label="errors/s")
    rate.set_ylabel("requests/s")
    rate.set_ylim(bottom=0)
    rate.legend(loc="upper right")
    ax1.set_title("latency over time")
    hi = float(np.percentile(ms, 99.9)) * 1.1
    ax2.hist(np.clip(ms, 0, hi), bins=80, color="tab:blue")
    for q in (50, 99):
        v = float(np.percentile(ms, q))
        ax2.axvline(v, color="k", ls="--" if q == 50 else ":", lw=1)
        ax2.text(v, ax2.get_ylim()[1] * 0.9, f" p{q} {v:.1f}", fontsize=8)
    ax2.set_xlabel("latency (ms)")
    ax2.set_ylabel("requests")
    ax2.set_title("latency histogram")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -- one run ---------------------------------------------------------------------------------
@dataclass
class LoadResult:
    summary: Summary
    locust_cpu_cores: float
    gateway_cpu_cores: float
    machine_util: float
    csv_prefix: Path
    samples: Path
    users: int
    candidates: str
    target_rps: float
    skip_s: float  # the ramp-up the summary dropped (seconds from the first completion)


def measure(stack: Any, host: str, name: str, pool_file: Path, users: int, duration_s: float, candidates: str,
            mode: str = "gateway", target_rps: float = 0.0, server: Any = None, skip_s: float = 2.0,
            seed: int = 0) -> LoadResult:
    """One Locust run against ``host``; its summary drops the first ``skip_s`` seconds (spawning)."""
    from .stack import run_locust

    watch = {"server": server} if server is not None else None
    run = run_locust(stack, host, users, duration_s, name, pool_file, candidates, mode, target_rps, seed=seed,
                     watch=watch)
    s = load_samples(run.samples)
    skip = min(skip_s, duration_s / 4)
    summary = summarize(s["t"], s["ms"], s["candidates"], s["ok"], skip_s=skip)
    return LoadResult(summary, run.cpu_cores, run.others_cores.get("server", float("nan")), run.machine_util,
                      run.csv_prefix, run.samples, users, candidates, target_rps, skip)


def check_execution(execution: str) -> None:
    """Raise ``ValueError`` unless ``execution`` is one the gateway knows (its settings' own list)."""
    from ctrserve.service.settings import BackendSettings

    executions = get_args(BackendSettings.model_fields["execution"].annotation)
    if execution not in executions:
        raise ValueError(f"execution must be one of {', '.join(executions)}, got {execution!r}")


def run(run_dir: Path | None = None, model: str = "mgdin", users: int = 8, duration_s: float = 30,
        candidates: str = "uniform:50:500", workers: int = 1, pool_threads: int = 2, intra_op_threads: int = 1,
        backend: str = "onnxruntime", warmup_s: float = 5, pool_users: int = 1000, target_rps: float = 0.0,
        out_dir: Path | None = None, record: bool = True, img_dir: Path | None = None,
        execution: str = "auto") -> dict[str, Any]:
    from ctrserve.paths import REPO_ROOT

    from .stack import Stack, free_port

    CandidateDist.parse(candidates)  # fail early on a bad spec
    if backend not in ("onnxruntime", "triton"):
        raise ValueError(f"backend must be onnxruntime or triton, got {backend!r}")
    check_execution(execution)
    started = time.time()
    from .report import machine_facts

    facts = machine_facts(gateway_workers=str(workers), ort_threads=f"intra {intra_op_threads}, inter 1, pool "
                          f"{pool_threads}", backend=backend)
    out_dir = out_dir or bench_dir() / "load"
    run_dir = Path(run_dir) if run_dir else ensure_run(model)
    repo = bench_dir() / "model_repository"
    version_dir = ensure_export(run_dir, repo, model)
    with Stack(out_dir) as stack, contextlib.ExitStack() as extra:
        redis_url = stack.redis()
        pool = build_pool(run_dir, version_dir, redis_url, pool_users)
        pool_file = out_dir / "pool.json"
        pool.save(pool_file)
        triton_url = None
        if backend == "triton":
            from ctrserve.export import triton_local

            server = triton_local.start(repo, models=[model], log_path=out_dir / "tritonserver.log")
            extra.callback(server.stop)
            triton_url = server.grpc_url
        port = free_port()
        gw = stack.gateway(repo, redis_url, port, workers, pool_threads, intra_op_threads, triton_url=triton_url,
                           execution=execution)
        host = f"http://127.0.0.1:{port}"
        if warmup_s > 0:
            measure(stack, host, "warmup", pool_file, users, warmup_s, candidates, skip_s=0)
        res = measure(stack, host, "run", pool_file, users, duration_s, candidates, target_rps=target_rps, server=gw)
    # --no-record leaves docs/ alone: the plot goes beside the run's other files
    img_dir = img_dir or (REPO_ROOT / "docs" / "img" if record else out_dir)
    img = plot_run(load_samples(res.samples), img_dir / "load_latency.png",
                   f"{model}, {users} users, {candidates} candidates, {workers} worker(s), {backend}; "
                   f"load avg {facts.get('load_avg_1m', '?')}")
    s = res.summary
    out = {"summary": s.as_dict(), "locust_cpu_cores": res.locust_cpu_cores, "gateway_cpu_cores":
           res.gateway_cpu_cores, "machine_util": res.machine_util, "csv": str(res.csv_prefix) + "_stats.csv",
           "samples": str(res.samples), "plot": str(img), "run_dir": str(run_dir), "seconds": time.time() - started,
           "users": users, "candidates": candidates, "workers": workers, "backend": backend,
           "execution": execution, "machine": facts}
    (out_dir / "summary.json").write_text(json.dumps(out, indent=1, default=str))
    if record:
        from .report import record_section, write_markdown

        what = f"{users} Locust users (closed loop{'' if not target_rps else f', paced to {target_rps:g} req/s'}), " \
               f"{candidates} candidates"
        figures = {
            "load_p50_ms": (round(s.p50_ms, 3), f"p50 latency, {what}"),
            "load_p95_ms": (round(s.p95_ms, 3), "p95 latency"),
            "load_p99_ms": (round(s.p99_ms, 3), "p99 latency"),
            "load_max_ms": (round(s.max_ms, 3), "max latency"),
            "load_rps": (round(s.rps, 2), "requests/s"),
            "load_candidates_per_s": (round(s.candidates_per_s, 1), "candidates scored per second"),
            "load_error_rate": (s.error_rate, f"failed / all requests ({s.errors} of {s.requests})"),
            "load_locust_cpu_cores": (round(res.locust_cpu_cores, 3), "CPU of the Locust process (1.0 = one core)"),
            "load_gateway_cpu_cores": (round(res.gateway_cpu_cores, 3), "CPU of the gateway process(es)"),
            "load_machine_util": (round(res.machine_util, 3), "whole-machine CPU utilisation during the run "
                                  "(0..1 of all cores; other work on the machine included)"),
        }
        notes = [f"Model {model} (run `{run_dir.name}`), gateway with {workers} worker(s), backend {backend}; "
                 f"{duration_s:g} s measured after a {warmup_s:g} s warm-up run, first "
                 f"{min(2.0, duration_s / 4):g} s (spawning) excluded; users drawn Zipf(1.1) from {pool_users} "
                 "loaded users.",
                 f"Plot: `{img.relative_to(REPO_ROOT) if img.is_relative_to(REPO_ROOT) else img}`; Locust CSV "
                 f"stats in `{res.csv_prefix.parent}`."]
        data = record_section(SECTION, "Load test: the gateway under Locust", "ctrserve bench load", figures, notes,
                              facts)
        write_markdown(SECTION, data)
    return out


def load_cmd(
    run_dir: Annotated[Path | None, typer.Option("--run", help="run directory (default: newest benchmark run of "
                                                 "--model, trained tiny if absent)")] = None,
    model: Annotated[str, typer.Option(help="model to train when no --run is given")] = "mgdin",
    users: Annotated[int, typer.Option(help="Locust users (concurrent clients)")] = 8,
    duration: Annotated[float, typer.Option(help="measured seconds")] = 30,
    candidates: Annotated[str, typer.Option(help="candidates per request: uniform:LO:HI, fixed:N, "
                                            "choice:A,B")] = "uniform:50:500",
    workers: Annotated[int, typer.Option(help="gateway worker processes")] = 1,
    pool_threads: Annotated[int, typer.Option(help="inference threads per worker")] = 2,
    backend: Annotated[str, typer.Option(help="onnxruntime (embedded) or triton (local binary)")] = "onnxruntime",
    warmup: Annotated[float, typer.Option(help="warm-up seconds (discarded)")] = 5,
    target_rps: Annotated[float, typer.Option(help="pace to this total request rate (0: closed loop)")] = 0.0,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json and .md")] = True,
    execution: Annotated[str, typer.Option(help="gateway execution: inline, thread or auto "
                                           "(CTRSERVE_BACKEND_EXECUTION; embedded ONNX Runtime)")] = "auto",
) -> None:
    """Start redis + gateway, run Locust headless for a fixed time, write CSV, summary and plots."""
    from rich.console import Console

    console = Console()
    try:
        out = run(run_dir, model, users, duration, candidates, workers, pool_threads, 1, backend, warmup,
                  target_rps=target_rps, record=record, execution=execution)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(out)
