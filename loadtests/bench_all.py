"""``ctrserve bench all``: every serving figure in one run, so the ratios compare like with like.

One command, one process, in this order (each figure is compared only with figures of the same
run; machine facts incl. the load average at start go into every section):

1. ``bench store`` (feature-store fetch, its own private Redis) -> section ``store``
2. the benchmark model (tiny MGDIN, synthetic, L = 600), exported to ONNX; a private Redis
   bulk-loaded with its dataset; a traffic pool; ONE fixed request (the most active user, B
   candidates) assembled by the gateway's own code from the store -> the inputs every runtime
   below gets
3. ``bench models`` on those inputs: eager / TorchScript / ORT / local Triton at B = 1, 100,
   1000 -> section ``models`` (incl. ``triton_hop_ms_batch1``)
4. FLOPs of the 100-candidate request (ONNX graph), fp32 matmul peak, ORT per-operator profile,
   raw ORT throughput on the cores the gateway gets
5. the gateway (subprocess): sequential requests interleaved with raw ORT calls on the same
   inputs -> ``e2e_p50_ms``, ``ort_p50_ms`` and the per-layer cost from its /metrics
6. Locust: step the users up until requests/s stop growing (saturation); a soak at half the
   saturation rate (p99/p50 and errors); a py-spy profile at saturation
7. the eager FastAPI baseline under the same Locust load
-> section ``serving`` of docs/benchmarks.json / .md, plots in docs/img/.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .run_load import bench_dir, build_pool, check_execution, ensure_export, ensure_run, measure, plot_run, prepared_of
from .stats import fifo_responses, load_samples, parse_prometheus, percentiles, saturation, stage_breakdown
from .traffic import Bodies, CandidateDist

SECTION = "serving"
MAX_USERS = 64


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one ``bench all`` run."""

    store_rounds: int = 4
    store_per_round: int = 500
    models_rounds: int = 3
    models_per_round: int = 100
    models_per_round_large: int = 10
    parity_rows: int | None = None
    e2e_rounds: int = 5
    e2e_per_round: int = 40
    throughput_s: float = 10
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    step_s: float = 20
    soak_s: float = 300
    profile_s: float = 15
    baseline_s: float = 60
    warmup_s: float = 5

    @classmethod
    def quick(cls, soak_s: float | None = None) -> Plan:
        return cls(store_rounds=1, store_per_round=100, models_rounds=1, models_per_round=10,
                   models_per_round_large=3, parity_rows=100, e2e_rounds=2, e2e_per_round=15, throughput_s=3,
                   steps=(1, 4, 16), step_s=6, soak_s=soak_s or 20, profile_s=6, baseline_s=8, warmup_s=2)


# -- one fixed request through the gateway's own code ----------------------------------------
async def _assemble(version_dir: Path, redis_url: str, namespace: str, user: str, items: list[str],
                    context: dict[str, Any], batches: list[int], reps: int) -> dict[str, Any]:
    """Inputs per B (the gateway's store read + assembly), and in-process timings of both at B=100."""
    from ctrserve.contract.manifest import Manifest
    from ctrserve.contract.store_schema import StoreSchema
    from ctrserve.feature_store.config import RedisStoreConfig
    from ctrserve.feature_store.redis_store import RedisOnlineStore
    from ctrserve.service.assemble import Assembler

    assembler = Assembler.from_dir(version_dir)
    schema = StoreSchema.from_feature_map(Manifest.load(version_dir).feature_map)
    # the gateway's store settings (item cache on, as served), only the URL differs
    async with RedisOnlineStore(schema, RedisStoreConfig(url=redis_url, timeout_ms=1000), namespace) as store:
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
            t2 = time.perf_counter()
            fetch.append((t1 - t0) * 1e3)
            assembly.append((t2 - t1) * 1e3)
    return {"inputs": inputs, "fetch_ms": fetch, "assembly_ms": assembly}


def _ort_session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()  # as the gateway's backend: sequential, full graph optimisation
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_threads(work: Any, n: int) -> float:
    """Run ``work(k)`` for k = 0..n-1 on n threads at once; the wall-clock seconds until all return."""
    t0 = time.monotonic()
    pool = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.monotonic() - t0


def ort_throughput(sess: Any, full: dict[str, np.ndarray], user_names: set[str], dist: CandidateDist,
                   threads: int, seconds: float) -> dict[str, float]:
    """Raw ORT candidates/s with ``threads`` Python threads sharing one session (the gateway's
    setup), requests sized by ``dist`` (candidate-side inputs sliced from ``full``)."""
    stop = time.monotonic() + seconds
    counts = [[0, 0] for _ in range(threads)]

    def work(k: int) -> None:
        rng = np.random.default_rng(k)
        while time.monotonic() < stop:
            n = dist.sample(rng)
            feed = {name: a if name in user_names else a[:n] for name, a in full.items()}
            sess.run(None, feed)
            counts[k][0] += 1
            counts[k][1] += n

    wall = run_threads(work, threads)
    return {"rps": sum(c[0] for c in counts) / wall, "candidates_per_s": sum(c[1] for c in counts) / wall}


def _metrics(port: int) -> dict:
    from .stack import http_get

    status, text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"gateway /metrics answered {status}")
    return parse_prometheus(text.decode())


def e2e_interleaved(port: int, body: bytes, sess: Any, inputs: dict[str, np.ndarray], rounds: int,
                    per_round: int) -> dict[str, Any]:
    """Sequential requests to the gateway (one keep-alive connection) and raw ORT runs on the
    same inputs, interleaved in rounds so machine noise hits both alike."""
    import orjson

    from .stack import KeepAliveClient

    conn = KeepAliveClient(port)
    for _ in range(5):  # warm: connection, item cache, ORT allocations at this B
        conn.post("/v1/score", body)
        sess.run(None, inputs)
    ref = sess.run(None, inputs)[0]
    status, content = conn.post("/v1/score", body)
    if status != 200:
        raise RuntimeError(f"gateway answered {status}: {content[:300]!r}")
    diff = float(np.max(np.abs(np.asarray(orjson.loads(content)["scores"]) - ref)))
    before = _metrics(port)
    e2e, ort = [], []
    for _ in range(rounds):
        for _ in range(per_round):
            t0 = time.perf_counter()
            status, _ = conn.post("/v1/score", body)
            e2e.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise RuntimeError(f"gateway answered {status} during the e2e measurement")
        for _ in range(per_round):
            t0 = time.perf_counter()
            sess.run(None, inputs)
            ort.append((time.perf_counter() - t0) * 1e3)
    stages = stage_breakdown(before, _metrics(port))
    conn.close()
    return {"e2e_ms": e2e, "ort_ms": ort, "stages": stages, "max_abs_diff_vs_ort": diff}


# -- plots -----------------------------------------------------------------------------------
def plot_saturation(steps: list[dict[str, float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [s["users"] for s in steps]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(users, [s["rps"] for s in steps], "o-", label="requests/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Locust users (closed loop)")
    ax.set_ylabel("requests/s")
    lat = ax.twinx()
    lat.plot(users, [s["p50_ms"] for s in steps], "s--", color="tab:orange", label="p50 ms")
    lat.plot(users, [s["p99_ms"] for s in steps], "^:", color="tab:red", label="p99 ms")
    lat.set_ylabel("latency (ms)")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -- the run ---------------------------------------------------------------------------------
def _p50(xs: list[float]) -> float:
    return percentiles(np.asarray(xs), (50,))[0]


def run_all(plan: Plan, run_dir: Path | None = None, model: str = "mgdin", candidates: str = "fixed:100",
            workers: int = 1, pool_threads: int = 2, pool_users: int = 1000, profile: bool = True,
            execution: str = "auto",
            with_triton: bool = True, log: Any = print) -> dict[str, Any]:
    import onnxruntime
    import torch

    from ctrserve.paths import REPO_ROOT

    from . import bench_models, bench_store, flops, profiles
    from .report import machine_facts, record_section, write_markdown
    from .stack import Stack, free_port, py_spy

    dist = CandidateDist.parse(candidates)
    check_execution(execution)  # before the model sections, not when the gateway starts
    t_start = time.time()
    from importlib.metadata import version  # never import locust here: it monkey-patches threads (gevent)

    pool = "" if execution == "inline" else f", {pool_threads} inference threads"
    facts = machine_facts(torch=torch.__version__, onnxruntime=onnxruntime.__version__, locust=version("locust"),
                          fastapi=version("fastapi"), uvicorn=version("uvicorn"),
                          threads=f"gateway: {workers} worker(s), {execution} execution, ORT intra-op 1 / inter-op 1"
                                  f"{pool}; raw ORT: intra-op 1; torch: {torch.get_num_threads()} "
                                  "(eager baseline: torch default)")
    log(f"[bench all] start, load average {facts.get('load_avg_1m')}")
    img_dir = REPO_ROOT / "docs" / "img"
    work = bench_dir() / "all"

    # 1. feature store (its own Redis and schema, L = 600, 100 candidates)
    log("[bench all] 1/7 feature store fetch")
    store = bench_store.run(rounds=plan.store_rounds, per_round=plan.store_per_round)

    # 2. model, store, pool, the fixed request
    log("[bench all] 2/7 model, export, Redis, traffic pool")
    run_dir = Path(run_dir) if run_dir else ensure_run(model)
    repo = bench_dir() / "model_repository"
    version_dir = ensure_export(run_dir, repo, model)
    model_file = version_dir / "model.onnx"
    fig: dict[str, tuple[Any, str]] = {}
    notes: list[str] = []
    with Stack(work) as stack:
        redis_url = stack.redis()
        pool = build_pool(run_dir, version_dir, redis_url, pool_users, baseline=True)
        pool_file = work / "pool.json"
        pool.save(pool_file)
        max_b = max(1000, dist.max)
        gw_bodies = Bodies(pool, max_b, "gateway")
        items = [pool.items[i] for i in gw_bodies.order(0)]
        batches = [1, 100, 1000]
        comp = asyncio.run(_assemble(version_dir, redis_url, prepared_of(run_dir).name, pool.users[0],
                                     items, pool.contexts[0], sorted({*batches, max_b}), 50 if plan.e2e_rounds > 2
                                     else 20))
        inputs = comp["inputs"]
        from ctrserve.contract.manifest import Manifest

        manifest = Manifest.load(version_dir)
        user_names = {t.name for t in manifest.user_inputs}
        seq_names = [f.name for f in manifest.feature_map.sequence_fields]
        body100 = gw_bodies.get(0, 100)
        base_body100 = Bodies(pool, max_b, "baseline").get(0, 100)

        # 3. runtimes on the same inputs
        log("[bench all] 3/7 runtimes: eager, TorchScript, ORT, Triton at B = 1, 100, 1000")
        models = bench_models.run_bench(run_dir, rounds=plan.models_rounds, per_round=plan.models_per_round,
                                        requests={b: inputs[b] for b in batches},
                                        per_round_large=plan.models_per_round_large, parity_rows=plan.parity_rows) \
            if with_triton else None

        # 4. FLOPs, peak, profile, raw throughput
        log("[bench all] 4/7 FLOPs, fp32 matmul peak, ORT profile, raw ORT throughput")
        count = flops.count_flops(model_file, inputs[100])
        # the model timed as the peak is (tight loop, 1 thread), interleaved with it round by round
        eff = flops.efficiency(_ort_session(model_file), inputs[100], count.total)
        events = flops.ort_profile_events(model_file, inputs[100], runs=20)
        by_op = flops.aggregate_profile(events, 20)
        seq_len = int(inputs[100][seq_names[0]].shape[-1]) if seq_names else 0
        seq_ms, seq_share = flops.shape_share(events, 20, (100, seq_len)) if seq_len else (0.0, 0.0)
        sess = _ort_session(model_file)
        full = inputs[max_b]
        # the best of 1 thread, the gateway's inference threads (inline: one per worker; thread: the
        # pools of all workers) and one per core: the target compares with the best raw rate on the
        # machine's cores, which the gateway uses all of (event loop, inference thread, Redis, Locust);
        # against the gateway's own thread count alone, one inference thread compared with one core
        infer_threads = workers * (1 if execution == "inline" else pool_threads)
        cores = os.cpu_count() or 1
        thr_by = {k: ort_throughput(sess, full, user_names, dist, k, plan.throughput_s)
                  for k in sorted({1, infer_threads, cores})}
        thr = max(thr_by.values(), key=lambda x: x["candidates_per_s"])

        # 5. gateway end to end, interleaved with raw ORT
        log("[bench all] 5/7 gateway end to end vs raw ORT (B = 100)")
        port = free_port()
        gw = stack.gateway(repo, redis_url, port, workers, pool_threads, execution=execution)
        host = f"http://127.0.0.1:{port}"
        e2e = e2e_interleaved(port, body100, sess, inputs[100], plan.e2e_rounds, plan.e2e_per_round)

        # 6. Locust: saturation, soak at half of it, profile
        log("[bench all] 6/7 Locust: saturation steps, soak, profile")
        measure(stack, host, "warmup", pool_file, plan.steps[0], plan.warmup_s, candidates, skip_s=0)
        steps: list[dict[str, float]] = []
        # the planned steps, then doubling (up to MAX_USERS) until requests/s stop growing
        ladder = list(plan.steps) + [plan.steps[-1] * 2**k for k in range(1, 8) if plan.steps[-1] * 2**k <= MAX_USERS]
        for users in ladder:
            r = measure(stack, host, f"step-{users}", pool_file, users, plan.step_s, candidates, server=gw)
            s = r.summary
            steps.append({"users": users, "rps": s.rps, "candidates_per_s": s.candidates_per_s, "p50_ms": s.p50_ms,
                          "p99_ms": s.p99_ms, "error_rate": s.error_rate, "locust_cpu": r.locust_cpu_cores,
                          "gateway_cpu": r.gateway_cpu_cores, "machine_util": r.machine_util})
            log(f"    {users:3d} users: {s.rps:7.1f} req/s, p50 {s.p50_ms:7.1f} ms, p99 {s.p99_ms:7.1f} ms, "
                f"errors {s.errors}, locust CPU {r.locust_cpu_cores:.2f} cores")
            peak_i, saturated = saturation([(int(x["users"]), x["rps"]) for x in steps])
            if saturated:
                break
        # the knee's users load the gateway for the soak, the profile and the baseline; the rate is
        # the best any step reached (at most 5 % above the knee's)
        sat = {**steps[peak_i], **{k: max(x[k] for x in steps) for k in ("rps", "candidates_per_s")}}
        half_rps = sat["rps"] / 2
        soak_users = max(2, int(sat["users"]))
        log(f"    saturation {sat['rps']:.1f} req/s, knee at {sat['users']:.0f} users (seen: {saturated}); soak "
            f"{plan.soak_s:g} s at {half_rps:.1f} req/s")
        soak = measure(stack, host, "soak", pool_file, soak_users, plan.soak_s, candidates, target_rps=half_rps,
                       server=gw)
        top: list[tuple[str, float]] = []
        shares: dict[str, float] = {}
        if profile and plan.profile_s > 0:
            out = work / "gateway.pyspy.txt"
            out.unlink(missing_ok=True)
            with py_spy(gw.pid, out, plan.profile_s) as prof:
                measure(stack, host, "profile", pool_file, int(sat["users"]), plan.profile_s, candidates, skip_s=0)
            if prof is not None and out.exists():
                stacks = profiles.read_collapsed(out)
                shares = profiles.inclusive_shares(stacks, profiles.GATEWAY_MARKERS)
                top = profiles.top_self(stacks, 8)
        stack.stop(gw)

        # 7. eager FastAPI baseline under the same load
        log("[bench all] 7/7 eager FastAPI baseline under the same Locust load")
        bport = free_port()
        base = stack.baseline(run_dir, bport)
        bhost = f"http://127.0.0.1:{bport}"
        measure(stack, bhost, "baseline-warmup", pool_file, int(sat["users"]), plan.warmup_s, candidates,
                mode="baseline", skip_s=0)
        baseline = measure(stack, bhost, "baseline", pool_file, int(sat["users"]), plan.baseline_s, candidates,
                           mode="baseline", server=base)

    # -- figures -----------------------------------------------------------------------------
    soak_s = soak.summary
    e2e_p50, ort_p50 = _p50(e2e["e2e_ms"]), _p50(e2e["ort_ms"])
    st = e2e["stages"]
    mean = {k: v["mean_ms"] for k, v in st.items()}
    in_app = mean.get("request_in_app", math.nan)
    stage_sum = sum(mean.get(k, 0.0) for k in ("route", "feature_fetch", "assembly", "inference"))
    e2e_mean, ort_mean = float(np.mean(e2e["e2e_ms"])), float(np.mean(e2e["ort_ms"]))
    gflops = eff["gflops"]
    gflops_e2e = count.total / (ort_p50 / 1e3) / 1e9
    seq_bytes = sum(inputs[100][n].nbytes for n in seq_names)
    backend_bytes = sum(a.nbytes for a in inputs[100].values())
    fig["e2e_p50_ms"] = (round(e2e_p50, 3), "gateway end to end, one client, sequential, 100 candidates, p50 (HTTP "
                         "request to the answer's last byte; keep-alive raw-socket client, loadtests/stack.py)")
    fig["e2e_p99_ms"] = (round(percentiles(np.asarray(e2e["e2e_ms"]), (99,))[0], 3), "same, p99")
    fig["ort_p50_ms"] = (round(ort_p50, 3), "raw ONNX Runtime in-process on the same assembled inputs, 1 intra-op "
                         "thread, interleaved with the e2e requests, p50")
    fig["e2e_over_ort_p50"] = (round(e2e_p50 / ort_p50, 3), "e2e p50 / raw ORT p50 (target <= 1.25)")
    fig["e2e_minus_ort_p50_ms"] = (round(e2e_p50 - ort_p50, 3), "what the service adds on top of the model, p50")
    for key, label in (("feature_fetch", "feature fetch (one Redis round trip + decode)"),
                       ("assembly", "assembly (feature map -> tensors)"),
                       ("inference", f"inference (ORT, {execution} execution)"), ("route", "A/B routing")):
        if key in mean:
            fig[f"layer_{key}_mean_ms"] = (round(mean[key], 3), f"gateway stage mean over the e2e requests: {label}")
    fig["layer_http_json_in_app_mean_ms"] = (round(in_app - stage_sum, 3), "in the app but outside the stages: "
                                             "body parsing/validation, response JSON, middleware, metrics")
    fig["layer_network_server_client_mean_ms"] = (round(e2e_mean - in_app, 3), "client-measured mean - in-app mean: "
                                                  "loopback TCP, uvicorn/httptools, the client")
    fig["layer_thread_hop_mean_ms"] = (round(mean.get("inference", math.nan) - ort_mean, 3),
                                       "inference stage mean - raw ORT mean: thread hand-off and wait (thread "
                                       "execution), cache effects of the request's other work (both)")
    fig["component_store_fetch_p50_ms"] = (round(_p50(comp["fetch_ms"]), 3), "in-process `online_read` of the same "
                                           "request (gateway store settings, item cache warm), p50")
    fig["component_assembly_p50_ms"] = (round(_p50(comp["assembly_ms"]), 3), "in-process assembly of the same "
                                        "request, p50")
    fig["gateway_scores_max_abs_diff_vs_ort"] = (e2e["max_abs_diff_vs_ort"], "|gateway scores - raw ORT on the "
                                                 "assembled inputs|: proves the inputs are the same")
    fig["http_request_bytes_b100"] = (len(body100), "gateway request body, 100 candidates (raw ids + context)")
    fig["baseline_request_bytes_b100"] = (len(base_body100), "eager baseline request body, 100 candidates "
                                          "(encoded features, the sequence once)")
    fig["backend_request_bytes_b100"] = (backend_bytes, "tensor bytes handed to the backend per request, 100 "
                                         "candidates")
    fig["backend_sequence_bytes_b100"] = (seq_bytes, f"of which the user sequence (batch 1, L = {seq_len}); per "
                                          f"candidate it would be {seq_bytes * 100:,} bytes")
    fig["flops_b100"] = (count.total, f"MatMul/Gemm/Conv/Einsum FLOPs of one 100-candidate request "
                         f"({count.nodes} nodes; loadtests/flops.py)")
    fig["ort_gflops"] = (round(gflops, 2), f"flops_b100 / raw ORT p50 at B = 100 in a tight loop, 1 thread "
                         f"({eff['model_p50_ms']:.3f} ms; {eff['rounds']} rounds x {eff['reps']} runs interleaved "
                         "with the peak's rounds)")
    fig["ort_gflops_e2e_interleaved"] = (round(gflops_e2e, 2), "flops_b100 / ort_p50_ms (ORT timed between "
                                         "gateway requests, as the e2e ratio uses it)")
    fig["sgemm_peak_gflops"] = (round(eff["peak_gflops"], 1), "fp32 n x n matmul peak, 1 thread (best of ORT "
                                "MatMul and numpy at n = 256, 512, 1024; best of the rounds interleaved with "
                                "the model's)")
    fig["ort_gflops_over_peak"] = (round(eff["ratio"], 4), "ort_gflops / sgemm_peak_gflops "
                                   "(target >= 0.5)")
    fig["ort_sequence_x_candidates_share"] = (round(seq_share, 3), f"share of ORT kernel time in nodes with a "
                                              f"[.., 100, .., {seq_len}, ..] output: the sequence broadcast to the "
                                              "candidates inside the graph")
    fig["ort_sequence_x_candidates_ms"] = (round(seq_ms, 3), "the same in ms per request (ORT profiler, whose "
                                           "timing adds overhead)")
    fig["ort_throughput_candidates_per_s"] = (round(thr["candidates_per_s"], 1), "raw ORT candidates/s, best of "
                                              + ", ".join(f"{k} thread(s) {v['candidates_per_s']:.0f}"
                                                          for k, v in thr_by.items())
                                              + f" (threads share one session, as in the gateway; {dist} candidates)")
    if 1 in thr_by and thr_by[1] is not thr:
        fig["gateway_over_ort1_throughput"] = (round(sat["candidates_per_s"] / thr_by[1]["candidates_per_s"], 3),
                                               "saturation candidates/s / raw ORT on one thread (the reference "
                                               "before session 10)")
    fig["saturation_rps"] = (round(sat["rps"], 2), f"gateway requests/s at saturation (best step; knee at "
                             f"{int(sat['users'])} users, {dist} candidates)")
    fig["saturation_candidates_per_s"] = (round(sat["candidates_per_s"], 1), "candidates/s at saturation")
    fig["saturation_p50_ms"] = (round(sat["p50_ms"], 3), "p50 at saturation")
    fig["saturation_p99_ms"] = (round(sat["p99_ms"], 3), "p99 at saturation")
    fig["gateway_over_ort_throughput"] = (round(sat["candidates_per_s"] / thr["candidates_per_s"], 3),
                                          "saturation candidates/s / raw ORT candidates/s (target >= 0.8)")
    free = max(cores - sat["locust_cpu"], 1e-9) / cores
    fig["gateway_over_ort_throughput_locust_free"] = (
        round(sat["candidates_per_s"] / (thr["candidates_per_s"] * free), 3),
        f"the same against raw ORT on the cores the load generator leaves: raw rate x (1 - Locust cores / "
        f"{cores})")
    fig["half_saturation_rps"] = (round(soak_s.rps, 2), f"achieved rate of the soak, paced to {half_rps:.1f} "
                                  f"req/s with {soak_users} users")
    fig["half_saturation_p50_ms"] = (round(soak_s.p50_ms, 3), "p50 at half saturation")
    fig["half_saturation_p99_ms"] = (round(soak_s.p99_ms, 3), "p99 at half saturation")
    fig["p99_over_p50_half_saturation"] = (round(soak_s.p99_ms / soak_s.p50_ms, 3), "p99 / p50 at half the "
                                           "saturation rate (target <= 2)")
    # the same send times served by ideal one-at-a-time servers whose service time is the sequential e2e latency
    soak_samples = load_samples(soak.samples)
    sent = soak_samples["t"] - soak_samples["ms"] / 1e3
    sent = sent[soak_samples["t"] >= soak_samples["t"].min() + soak.skip_s]  # the requests the summary kept
    ideal = {c: percentiles(fifo_responses(sent, np.asarray(e2e["e2e_ms"]), servers=c), (50, 99)) for c in (1, 2)}
    for c, name in ((1, "single_server"), (2, "two_server")):
        p50, p99 = ideal[c]
        fig[f"p99_over_p50_{name}_bound"] = (round(p99 / p50, 3), (
            "p99 / p50 that an ideal first-come-first-served server would give on the soak's own send times, "
            "each request served in a sequential e2e latency drawn from this run (stats.fifo_responses): the "
            "queueing part of the tail, which faster code in a one-at-a-time server (inline execution, one worker) "
            "cannot remove") if c == 1 else "the same with two ideal servers (two requests served at once)")
        fig[f"{name}_bound_p50_ms"] = (round(p50, 3), f"the {c}-server bound's p50")
        fig[f"{name}_bound_p99_ms"] = (round(p99, 3), f"the {c}-server bound's p99 (compare half_saturation_p99_ms)")
    fig["soak_seconds"] = (round(soak_s.duration_s, 1), "measured soak duration")
    fig["soak_requests"] = (soak_s.requests, "requests in the soak")
    fig["soak_errors"] = (soak_s.errors, "failed requests in the soak (status, score count, range checks; target 0)")
    fig["locust_cpu_cores_saturation"] = (round(sat["locust_cpu"], 3), "CPU of the Locust process at saturation "
                                          "(1.0 = one core)")
    fig["gateway_cpu_cores_saturation"] = (round(sat["gateway_cpu"], 3), "CPU of the gateway at saturation")
    fig["machine_util_saturation"] = (round(sat["machine_util"], 3), "whole-machine CPU use at saturation (0..1; "
                                      "includes other work on the machine)")
    bs = baseline.summary
    fig["eager_fastapi_rps"] = (round(bs.rps, 2), f"eager FastAPI baseline, {int(sat['users'])} users, same traffic")
    fig["eager_fastapi_p50_ms"] = (round(bs.p50_ms, 3), "its p50")
    fig["eager_fastapi_errors"] = (bs.errors, "its failed requests")
    fig["eager_fastapi_over_gateway_throughput"] = (round(bs.candidates_per_s / sat["candidates_per_s"], 3),
                                                    "baseline candidates/s / gateway candidates/s at the same "
                                                    "users")
    if models is not None:
        fig["models_ort_p50_ms_b100_same_run"] = (models["figures"]["ort_p50_ms_b100"], "ORT p50 at B = 100 from "
                                                  "the `models` section of this run (test harness of bench models)")

    # -- plots and notes ---------------------------------------------------------------------
    title = f"{model}, {dist} candidates, load avg {facts.get('load_avg_1m')} at start"
    soak_png = plot_run(soak_samples, img_dir / "bench_soak.png", f"soak at half saturation: {title}")
    sat_png = plot_saturation(steps, img_dir / "bench_saturation.png", f"saturation: {title}")
    notes += _verdicts(fig)
    notes.append(f"Tail at half saturation: measured p50/p99 {soak_s.p50_ms:.2f}/{soak_s.p99_ms:.2f} ms (ratio "
                 f"{fig['p99_over_p50_half_saturation'][0]:g}); ideal servers on the same send times, serving each "
                 "request in a sequential e2e latency of this run (queueing alone): one server "
                 f"{ideal[1][0]:.2f}/{ideal[1][1]:.2f} ms (ratio {ideal[1][1] / ideal[1][0]:.2f}), two servers "
                 f"{ideal[2][0]:.2f}/{ideal[2][1]:.2f} ms (ratio {ideal[2][1] / ideal[2][0]:.2f}).")
    notes.append("Layer costs (means, ms, over the sequential e2e requests): " + ", ".join(
        f"{k} {v['mean_ms']:.2f}" for k, v in st.items()) + f"; client e2e {e2e_mean:.2f}; raw ORT {ort_mean:.2f}.")
    notes.append("ORT kernel time by operator at B = 100 (ms per request): " + ", ".join(
        f"{op} {ms:.2f} ({share:.0%})" for op, ms, share in by_op[:8]) + ".")
    if shares:
        notes.append(f"py-spy on the gateway at saturation ({plan.profile_s:g} s, share of samples, inclusive): " +
                     ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) + ".")
        notes.append("py-spy hottest leaf frames: " + "; ".join(f"`{f[:90]}` {s:.0%}" for f, s in top[:5]) + ".")
    notes.append("Saturation steps (users: req/s, p50/p99 ms): " + ", ".join(
        f"{s['users']:.0f}: {s['rps']:.1f}, {s['p50_ms']:.0f}/{s['p99_ms']:.0f}" for s in steps) +
        ("" if saturated else " — requests/s still grew at the last step: saturation not reached, the figures "
         "use the best step"))
    notes.append(f"Method: one `ctrserve bench all` process; the fixed request is the most active pool user with "
                 f"B candidates, its inputs assembled by the gateway's own code from the store; gateway with "
                 f"{workers} worker(s); Locust closed-loop users stepped {list(plan.steps)} for {plan.step_s:g} s "
                 f"each (saturation = the step after which requests/s grew < 5 %); the soak runs at half that rate "
                 f"(paced users: each sends one request at a random moment of every period, traffic.Pacer) "
                 f"and gives both p99/p50 and soak_errors; the first 2 s of each Locust run are "
                 f"dropped. Plots: `{soak_png.relative_to(REPO_ROOT)}`, `{sat_png.relative_to(REPO_ROOT)}`. Raw "
                 f"files: `{work}`.")
    notes.append(f"store_fetch_p50_ms ({store['figures']['store_fetch_p50_ms']:.3f} ms) and triton_hop_ms_batch1 "
                 "come from the `store` and `models` sections, written by this same run.")
    facts["load_avg_1m_end"] = _loadavg()
    facts["seconds"] = round(time.time() - t_start)
    data = record_section(SECTION, "Serving: end to end vs raw inference, saturation, soak, baseline",
                          "ctrserve bench all", fig, notes, facts)
    write_markdown(SECTION, data)
    return {"figures": {k: v for k, (v, _) in fig.items()}, "steps": steps, "notes": notes}


def _loadavg() -> float:
    import os

    return round(os.getloadavg()[0], 1)


def _verdicts(fig: dict[str, tuple[Any, str]]) -> list[str]:
    """One line per target: met or missed, and by how much."""
    rows = [("e2e p50 <= 1.25 x raw ORT p50", "e2e_over_ort_p50", 1.25, "le"),
            ("p99 <= 2 x p50 at half saturation", "p99_over_p50_half_saturation", 2.0, "le"),
            ("zero soak errors", "soak_errors", 0, "le"),
            ("candidates/s at saturation >= 0.8 x raw ORT", "gateway_over_ort_throughput", 0.8, "ge"),
            ("ORT GFLOP/s >= 0.5 x fp32 matmul peak", "ort_gflops_over_peak", 0.5, "ge")]
    out = []
    for what, key, limit, op in rows:
        v = fig[key][0]
        ok = v <= limit if op == "le" else v >= limit
        if ok:
            out.append(f"Target {what}: met ({key} = {v:g}).")
        else:
            by = (v - limit) if key == "soak_errors" else (v / limit if op == "le" else limit / v if v else math.inf)
            out.append(f"Target {what}: MISSED ({key} = {v:g}; " +
                       (f"{by:g} errors" if key == "soak_errors" else f"{by:.2f}x off") + ").")
    return out


def all_cmd(
    quick: Annotated[bool, typer.Option("--quick", help="short trial run (~2-4 min; figures are rough)")] = False,
    soak: Annotated[float | None, typer.Option(help="soak seconds (default 300; 20 with --quick)")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run", help="run directory (default: newest benchmark run of "
                                                 "--model, trained tiny if absent)")] = None,
    model: Annotated[str, typer.Option(help="model (the targets are stated for mgdin)")] = "mgdin",
    candidates: Annotated[str, typer.Option(help="candidates per request in the Locust runs")] = "fixed:100",
    workers: Annotated[int, typer.Option(help="gateway worker processes")] = 1,
    pool_threads: Annotated[int, typer.Option(help="inference threads per gateway worker (thread and auto "
                                                   "execution)")] = 2,
    execution: Annotated[str, typer.Option(
        help="gateway execution: inline, thread or auto (CTRSERVE_BACKEND_EXECUTION)")] = "auto",
    profile: Annotated[bool, typer.Option(help="py-spy the gateway at saturation")] = True,
    triton: Annotated[bool, typer.Option(help="run the runtime comparison (bench models, incl. Triton)")] = True,
) -> None:
    """Regenerate every serving benchmark in one run -> docs/benchmarks.md and docs/benchmarks.json."""
    from rich.console import Console

    console = Console()
    plan = Plan.quick(soak) if quick else Plan(soak_s=soak if soak is not None else 300)
    try:
        out = run_all(plan, run_dir, model, candidates, workers, pool_threads, profile=profile, execution=execution,
                      with_triton=triton, log=console.print)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(out["figures"])
    for line in out["notes"][:5]:
        console.print(line)
