"""``ctrserve demo``: the main job end to end on an embedded default (the seeded synthetic
dataset, no files needed): prepare data, train two small models (or reuse the last demo runs:
``demo_arms.py``), a baseline and MGDIN, calibrate MGDIN's masks to static ones, export both to
ONNX with the parity gate, bulk-load a Redis feature store (a private redis-server unless
``--redis-url``), start the scoring gateway (embedded ONNX Runtime unless a Triton URL is given,
or ``--triton``: the local tritonserver started on the demo's model repository) with users split
50/50 between the two (the repository keeps every model a demo exported), score sample requests
over HTTP and print them, replay a slice of the test split with its labels sent back as clicks
(``POST /v1/events``) and print the outcome report of both arms (the closed loop), then shut
everything down. ``--serve`` keeps the gateway up until SIGINT (Ctrl-C) or SIGTERM. The
processes are children of one ``ctrserve.launch.Launcher``: they are stopped on every way out,
a signal to the demo's pid included.

Each step is a function, so tests and other commands can chain them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ctrserve.demo_arms import TREATMENT, demo_arms, step_export, write_routing
from ctrserve.launch import GatewayServer, Interrupted, Launcher, start_gateway, start_redis

if TYPE_CHECKING:
    from ctrserve.export.triton_local import TritonServer

console = Console()


def start_local_triton(launcher: Launcher, repo: Path, models: list[str], log: Path) -> TritonServer:
    """The local tritonserver (nvidia-pytriton binary, ``export/triton_local.py``) serving ``models``
    from the demo's repository (local config flavour), a child of ``launcher``."""
    from ctrserve.export import triton_local

    t0 = time.perf_counter()
    server = triton_local.start(repo, models=models, log_path=log, launcher=launcher)
    console.print(f"[bold]triton[/] local tritonserver ready in {time.perf_counter() - t0:.1f} s: grpc "
                  f"{server.grpc_url}, metrics {server.metrics_url}; log: {log}")
    return server


def stop_local_triton(server: TritonServer, models: list[str]) -> None:
    for model in models:
        n = triton_inference_count(server.metrics_url, model)
        console.print(f"[bold]triton[/] served {n} inference requests for {model} (nv_inference_count, warm-up "
                      "included)")
    code = server.stop()
    console.print(f"[bold]triton[/] stopped (exit code {code})")


def triton_inference_count(metrics_url: str, model: str) -> int:
    """Sum of Triton's ``nv_inference_count`` over the versions of ``model`` (0 if unreadable)."""
    import httpx

    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_count{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def step_load_store(prepared: Path, redis_url: str) -> None:
    import asyncio

    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.loader import load_prepared

    t0 = time.perf_counter()
    version, rec = asyncio.run(load_prepared(prepared, RedisStoreConfig(url=redis_url)))
    console.print(f"[bold]feature store[/] loaded {len(rec.users):,} users and {len(rec.items):,} items as "
                  f"version {version} of namespace {prepared.name!r} in {time.perf_counter() - t0:.1f} s")


def start_demo_gateway(launcher: Launcher, repo: Path, routing: Path, redis_url: str, port: int,
                       triton_url: str | None, log: Path) -> GatewayServer:
    """``ctrserve serve`` as a child of ``launcher``, routed to the demo's model; returns once
    ``/readyz`` answers 200 (at once with the gateway's reason on a configuration error)."""
    env = {"CTRSERVE_SERVER_ACCESS_LOG": "false"}
    if triton_url:  # the extra hop on a shared 2-core machine: roomier budgets unless the caller set them
        env["CTRSERVE_BACKEND_TIMEOUT_MS"] = os.environ.get("CTRSERVE_BACKEND_TIMEOUT_MS", "2000")
        env["CTRSERVE_API_DEADLINE_MS"] = os.environ.get("CTRSERVE_API_DEADLINE_MS", "4000")
    t0 = time.perf_counter()
    gateway = start_gateway(launcher, repo, redis_url, port=port, routing=routing, triton_url=triton_url, env=env,
                            log=log, ready_timeout=120)
    backend = f"Triton at {triton_url}" if triton_url else "embedded ONNX Runtime"
    console.print(f"[bold]gateway[/] ready on {gateway.url} ({backend}) in {time.perf_counter() - t0:.1f} s; "
                  f"log: {log}")
    return gateway


def sample_requests(prepared: Path, n: int, candidates: int = 5, seed: int = 0) -> list[dict]:
    """Requests for ``n`` test users with raw ids: their own test items plus random popular items."""
    import numpy as np

    from ctrserve.contract.feature_map import FeatureMap
    from ctrserve.contract.prepared import load_split

    fmap = FeatureMap.load(prepared / "feature_map.json")
    vocab = json.loads((prepared / "vocab.json").read_text())
    test = load_split(prepared, "test")
    rng = np.random.default_rng(seed)

    def raw(feature: str, i: int) -> str:
        return vocab[fmap.feature(feature).embedding or feature][int(i) - 2]

    rows = rng.permutation(np.flatnonzero((test["user_id"] >= 2) & (test["item_id"] >= 2)))[:n]
    items = vocab["item_id"]
    out = []
    for r in rows:
        cands = [raw("item_id", test["item_id"][r])] + [items[int(k)] for k in rng.integers(0, 50, candidates - 1)]
        ctx = {f.name: raw(f.name, test[f.name][r]) for f in fmap.features
               if f.side == "context" and test[f.name][r] >= 2}
        out.append({"request_id": f"demo-{len(out) + 1}", "user_id": raw("user_id", test["user_id"][r]),
                    "context": ctx, "candidates": [{"item_id": c} for c in cands]})
    return out


def step_score(url: str, requests: list[dict]) -> None:
    """POST each request and print user, context, candidates with scores, arm and latency."""
    import httpx

    with httpx.Client(base_url=url, timeout=10) as client:
        client.post("/v1/score", json=requests[0])  # first call opens the connection
        for body in requests:
            t0 = time.perf_counter()
            r = client.post("/v1/score", json=body)
            ms = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"gateway answered {r.status_code}: {r.text}")
            out = r.json()
            console.print(f"[bold]POST /v1/score[/] {out['request_id']}: user {body['user_id']}, context "
                          f"{json.dumps(body['context'])} -> arm [bold]{out['arm']}[/] ({out['model']} "
                          f"v{out['version']}), {ms:.1f} ms" + (f", flags {out['flags']}" if out.get("flags") else ""))
            scored = zip(body["candidates"], out["scores"], strict=True)
            console.print("    " + "   ".join(f"item {c['item_id']}: {s:.4f}" for c, s in scored))


def demo_cmd(
    model: Annotated[str, typer.Option(help=(
        f"registered model of the baseline arm; the other arm is MGDIN with static masks ({TREATMENT}); "
        "mgdin: the baseline is MGDIN with per-request masks, the same weights"))] = "deepfm",
    seed: Annotated[int, typer.Option(help="random seed")] = 2026,
    retrain: Annotated[bool, typer.Option(help="train even if a finished demo run exists")] = False,
    redis_url: Annotated[str | None, typer.Option(help="use this Redis instead of a private redis-server")] = None,
    redis_cluster: Annotated[bool, typer.Option("--redis-cluster", help=(
        "a private Redis Cluster (3 masters + 3 replicas on loopback) instead of one redis-server"))] = False,
    triton_url: Annotated[str | None, typer.Option(
        help="score through Triton (gRPC host:port) serving the demo model repository, instead of embedded "
             "ONNX Runtime")] = None,
    triton: Annotated[bool, typer.Option("--triton", help=(
        "start the local tritonserver (nvidia-pytriton) on the demo model repository and score through it; "
        "stopped at the end"))] = False,
    serve: Annotated[bool, typer.Option("--serve", help="keep the gateway up until Ctrl-C or SIGTERM")] = False,
    port: Annotated[int, typer.Option(help="gateway port (0: a free one)")] = 0,
    requests: Annotated[int, typer.Option(help="sample requests to score")] = 3,
    replay_users: Annotated[int, typer.Option(help="test-split users replayed with their clicks, then the "
                                                   "outcome report (0: none)")] = 200,
) -> None:
    """Run the main job end to end: train two arms, export, load the feature store, serve an A/B split,
    score over HTTP, replay clicks and report both arms."""
    from ctrserve.paths import settings

    if triton and triton_url:
        console.print("[red]error:[/] --triton starts a local Triton; --triton-url uses a running one: pick one")
        raise typer.Exit(2)

    work_dir = settings().work_dir
    try:
        arms = demo_arms(model, work_dir, seed, retrain)
    except ValueError as exc:  # an unknown --model
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    prepared = Path((arms[0].run_dir / "prepared_dir.txt").read_text().strip())
    demo_dir = work_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    try:
        repo = demo_dir / "model_repository"
        for arm in arms:
            step_export(arm.run_dir, repo, arm.name)
        routing = write_routing(demo_dir / f"routing-{model}-{TREATMENT}.yaml", arms)
        step_serve(prepared, repo, routing, [a.name for a in arms], demo_dir, redis_url=redis_url,
                   redis_cluster=redis_cluster, triton=triton, triton_url=triton_url, port=port,
                   requests=requests, serve=serve, replay_users=replay_users)
    except Interrupted as exc:  # every child is stopped by now
        console.print(f"[bold]stopped[/] by {exc.name}")
        raise typer.Exit(128 + exc.signum) from None
    except Exception as exc:  # one clear line instead of a trace for the usual failures
        from ctrserve.export.exporter import ExportError

        if isinstance(exc, ExportError | RuntimeError | OSError):
            console.print(f"[red]demo failed:[/] {exc}")
            raise typer.Exit(1) from None
        raise


def step_serve(prepared: Path, repo: Path, routing: Path, models: list[str], demo_dir: Path, *, redis_url: str | None,
               triton: bool, triton_url: str | None, port: int, requests: int, serve: bool,
               redis_cluster: bool = False, replay_users: int = 0) -> None:
    """Start the services as children of one launcher (a private redis-server unless ``redis_url``,
    the local Triton with ``triton``, the gateway serving ``models``, the arms of ``routing``), load
    the store, score the sample requests, replay ``replay_users`` users with clicks and report the arms,
    with ``serve`` keep serving until SIGINT/SIGTERM; every child is stopped on the way out."""
    with Launcher() as launcher:
        if redis_url is None and redis_cluster:
            from ctrserve.launch_cluster import start_redis_cluster

            redis_url = start_redis_cluster(launcher).url
            console.print(f"[bold]redis[/] private Redis Cluster (3 masters + 3 replicas) at {redis_url}")
        if redis_url is None:
            redis = start_redis(launcher)
            console.print(f"[bold]redis[/] private redis-server on port {redis.port}")
            redis_url = redis.url
        step_load_store(prepared, redis_url)
        server = start_local_triton(launcher, repo, models, demo_dir / "tritonserver.log") if triton else None
        if server is not None:
            triton_url = server.grpc_url
        gateway = start_demo_gateway(launcher, repo, routing, redis_url, port, triton_url, demo_dir / "gateway.log")
        step_score(gateway.url, sample_requests(prepared, requests))
        if replay_users and redis_cluster:
            console.print("[yellow]replay skipped:[/] the click events script needs one Redis node, not a cluster")
        elif replay_users:
            step_replay(gateway.url, prepared, redis_url, replay_users, models)
        if serve:
            try:
                console.print(f"[bold]serving[/] {gateway.url}  (POST /v1/score, GET /readyz, /metrics, /docs); "
                              "Ctrl-C or SIGTERM stops")
                exited = launcher.wait_any()
            except Interrupted as exc:  # the way --serve ends: the launcher stops every child at once
                console.print(f"[bold]{exc.name}[/]: stopping the gateway{', Triton' if triton else ''} and the "
                              "feature store")
                return
            raise RuntimeError(f"{exited.name} exited with code {exited.proc.returncode}; log {exited.log}:\n"
                               f"{exited.log_tail()}")
        console.print(f"[bold]shutting down[/] gateway{', Triton' if triton else ''} and feature store")
        launcher.stop(gateway.child)
        if server is not None:
            stop_local_triton(server, models)


def step_replay(url: str, prepared: Path, redis_url: str, n_users: int, arms: list[str]) -> None:
    """The closed loop: replay the first ``n_users`` users of the test split through the gateway,
    send their true labels back as clicks (``POST /v1/events``), print the outcome report of
    ``arms`` (the first is the control)."""
    import asyncio

    from ctrserve.ab import format_report, read_log, report
    from ctrserve.loadtests.replay import replay, replay_requests

    users = replay_requests(prepared)[:n_users]
    t0 = time.perf_counter()
    prefix = f"demo-{time.time_ns()}"
    result = asyncio.run(replay(url, users, "default", prefix=prefix))
    console.print(f"[bold]replay[/] {sum(len(g) for g in users):,} requests of {len(users):,} test users, "
                  f"{result.events_accepted:,} clicks sent back in {time.perf_counter() - t0:.1f} s")
    # the log also holds the sample requests (no clicks) and, on a Redis of your own, earlier demos
    log = read_log("default", redis_url).with_request_prefix(prefix + "-")
    typer.echo(format_report(report(log, arms)))  # unwrapped: a wide table
