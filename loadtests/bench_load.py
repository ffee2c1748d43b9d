"""``ctrserve bench load``: the whole serving stack under Locust, headless, bounded in time.

The benchmark run exported to ONNX, a private redis-server bulk-loaded with its data, a traffic pool
from what was loaded, the gateway (embedded ONNX Runtime or the local Triton binary), a discarded
Locust warm-up, the measured run -> CSV stats, a summary (latency percentiles, requests/s,
candidates/s, errors, CPU of Locust and the gateway) and a plot. Every child is stopped on exit.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from ctrserve.launch import Launcher, start_redis

from .harness import Figures, failing_as_exit, machine_facts
from .load import LoadResult, measure, plot_run
from .stack import GatewaySetup
from .stats import load_samples
from .traffic import CandidateDist
from .workload import bench_dir, build_pool, ensure_export, ensure_run

SECTION = "load"


def load_figures(res: LoadResult, what: str) -> Figures:
    s, fig = res.summary, Figures()
    fig.add("load_p50_ms", round(s.p50_ms, 3), f"p50 latency, {what}")
    fig.add("load_p95_ms", round(s.p95_ms, 3), "p95 latency")
    fig.add("load_p99_ms", round(s.p99_ms, 3), "p99 latency")
    fig.add("load_max_ms", round(s.max_ms, 3), "max latency")
    fig.add("load_rps", round(s.rps, 2), "requests/s")
    fig.add("load_candidates_per_s", round(s.candidates_per_s, 1), "candidates scored per second")
    fig.add("load_error_rate", s.error_rate, f"failed / all requests ({s.errors} of {s.requests})")
    fig.add("load_locust_cpu_cores", round(res.locust_cpu_cores, 3), "CPU of the Locust process (1.0 = one core)")
    fig.add("load_gateway_cpu_cores", round(res.gateway_cpu_cores, 3), "CPU of the gateway process(es)")
    fig.add("load_machine_util", round(res.machine_util, 3), "whole-machine CPU utilisation during the run "
            "(0..1 of all cores; other work on the machine included)")
    return fig


def run(run_dir: Path | None = None, model: str = "mgdin", users: int = 8, duration_s: float = 30,
        candidates: str = "uniform:50:500", gateway: GatewaySetup | None = None, backend: str = "onnxruntime",
        warmup_s: float = 5, pool_users: int = 1000, target_rps: float = 0.0, out_dir: Path | None = None,
        record: bool = True, img_dir: Path | None = None) -> dict[str, Any]:
    from ctrserve.paths import REPO_ROOT

    gateway = gateway or GatewaySetup()
    CandidateDist.parse(candidates)  # fail early on a bad spec
    if backend not in ("onnxruntime", "triton"):
        raise ValueError(f"backend must be onnxruntime or triton, got {backend!r}")
    started = time.time()
    facts = machine_facts(threads=gateway.describe(), backend=backend)
    out_dir = out_dir or bench_dir() / "load"
    run_dir = Path(run_dir) if run_dir else ensure_run(model)
    repo = bench_dir() / "model_repository"
    version_dir = ensure_export(run_dir, repo, model)
    # the server's own stop (which also removes its scratch files) before the launcher's
    with Launcher(out_dir) as launcher, contextlib.ExitStack() as servers:
        redis_url = start_redis(launcher, timeout=15).url
        pool_file = out_dir / "pool.json"
        build_pool(run_dir, version_dir, redis_url, pool_users).save(pool_file)
        triton_url = None
        if backend == "triton":
            from ctrserve.export import triton_local

            triton_url = servers.enter_context(triton_local.start(
                repo, models=[model], log_path=out_dir / "tritonserver.log", launcher=launcher)).grpc_url
        gw = gateway.start(launcher, repo, redis_url, triton_url)
        if warmup_s > 0:
            measure(launcher, gw.url, "warmup", pool_file, users, warmup_s, candidates, skip_s=0)
        res = measure(launcher, gw.url, "run", pool_file, users, duration_s, candidates, target_rps=target_rps,
                      server_pid=gw.proc.pid)
    # --no-record leaves docs/ alone: the plot goes beside the run's other files
    img_dir = img_dir or (REPO_ROOT / "docs" / "img" if record else out_dir)
    img = plot_run(load_samples(res.samples), img_dir / "load_latency.png",
                   f"{model}, {users} users, {candidates} candidates, {gateway.workers} worker(s), {backend}; "
                   f"load avg {facts.get('load_avg_1m', '?')}")
    out = {"summary": asdict(res.summary), "locust_cpu_cores": res.locust_cpu_cores,
           "gateway_cpu_cores": res.gateway_cpu_cores, "machine_util": res.machine_util,
           "csv": str(res.csv_prefix) + "_stats.csv", "samples": str(res.samples), "plot": str(img),
           "run_dir": str(run_dir), "seconds": time.time() - started, "users": users, "candidates": candidates,
           "gateway": gateway.describe(), "backend": backend, "machine": facts}
    (out_dir / "summary.json").write_text(json.dumps(out, indent=1, default=str))
    if record:
        what = f"{users} Locust users (closed loop{'' if not target_rps else f', paced to {target_rps:g} req/s'}), " \
               f"{candidates} candidates"
        notes = [f"Model {model} (run `{run_dir.name}`), gateway with {gateway.workers} worker(s), backend {backend}; "
                 f"{duration_s:g} s measured after a {warmup_s:g} s warm-up run, first "
                 f"{min(2.0, duration_s / 4):g} s (spawning) excluded; users drawn Zipf(1.1) from {pool_users} "
                 "loaded users.",
                 f"Plot: `{img.relative_to(REPO_ROOT) if img.is_relative_to(REPO_ROOT) else img}`; Locust CSV "
                 f"stats in `{res.csv_prefix.parent}`."]
        load_figures(res, what).record(SECTION, "Load test: the gateway under Locust", "ctrserve bench load", notes,
                                       facts)
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
    with failing_as_exit(console):
        out = run(run_dir, model, users, duration, candidates, GatewaySetup(workers, pool_threads, execution),
                  backend, warmup, target_rps=target_rps, record=record)
    console.print(out)
