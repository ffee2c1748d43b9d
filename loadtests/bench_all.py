"""``ctrserve bench all``: every serving figure in one run, so the ratios compare like with like.

One process runs the steps listed in ``ServingRun.run`` (the Locust ones are in bench_all_load.py),
each adding (name, value, meaning) rows to one ``Figures``, on the benchmark model (tiny MGDIN,
synthetic, L = 600) and one fixed request (the most active pool user, B candidates) assembled by
the gateway's own code from the store. ``bench store`` and ``bench models`` record their sections
from here; this run records ``serving`` and its plots in docs/img/ (``--no-record``: nothing is
written to docs/, the plots go beside the raw files). Machine facts go into every section.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ctrserve.launch import Launcher, start_redis

from .bench_all_load import BATCHING_FIGURES, LoadSteps
from .harness import Figures, Log, console_log, failing_as_exit, interleave, machine_facts, ort_session, p50, run_steps
from .stack import GatewaySetup, gateway_metrics
from .stats import percentiles, stage_breakdown
from .traffic import Bodies, CandidateDist
from .workload import assemble_request, bench_dir, build_pool, ensure_export, ensure_run, prepared_of

SECTION = "serving"
BATCHED_SECTION = "serving_batched"
BATCHES = [1, 100, 1000]


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
    baseline_s: float = 60
    warmup_s: float = 5

    @classmethod
    def quick(cls, soak_s: float | None = None) -> Plan:
        return cls(store_rounds=1, store_per_round=100, models_rounds=1, models_per_round=10,
                   models_per_round_large=3, parity_rows=100, e2e_rounds=2, e2e_per_round=15, throughput_s=3,
                   steps=(1, 4, 16), step_s=6, soak_s=soak_s or 20, baseline_s=8, warmup_s=2)


@dataclass(frozen=True)
class Options:
    """What the command line chooses besides the plan."""

    model: str = "mgdin"
    candidates: str = "fixed:100"
    gateway: GatewaySetup = field(default_factory=GatewaySetup)
    with_triton: bool = True
    record: bool = True


def ort_throughput(sess: Any, full: dict[str, np.ndarray], user_names: set[str], dist: CandidateDist,
                   threads: int, seconds: float) -> dict[str, float]:
    """Raw ORT candidates/s with ``threads`` Python threads sharing one session (the gateway's
    setup), requests sized by ``dist`` (candidate-side inputs sliced from ``full``)."""
    from concurrent.futures import ThreadPoolExecutor

    stop = time.monotonic() + seconds
    counts = [[0, 0] for _ in range(threads)]

    def work(k: int) -> None:
        rng = np.random.default_rng(k)
        while time.monotonic() < stop:
            n = dist.sample(rng)
            sess.run(None, {name: a if name in user_names else a[:n] for name, a in full.items()})
            counts[k][0] += 1
            counts[k][1] += n

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    wall = time.monotonic() - t0
    return {"rps": sum(c[0] for c in counts) / wall, "candidates_per_s": sum(c[1] for c in counts) / wall}


def e2e_interleaved(port: int, body: bytes, sess: Any, inputs: dict[str, np.ndarray], rounds: int,
                    per_round: int, silent_port: int | None = None) -> dict[str, Any]:
    """Sequential requests to the gateway (one keep-alive connection) and raw ORT runs on the
    same inputs, interleaved in rounds so machine noise hits both alike; with ``silent_port``, the
    same requests to a second gateway that logs no impressions, interleaved too."""
    import orjson

    from .stack import KeepAliveClient

    conn = KeepAliveClient(port)
    silent = KeepAliveClient(silent_port) if silent_port else None
    for _ in range(5):  # warm: connection, item cache, ORT allocations at this B
        conn.post("/v1/score", body)
        sess.run(None, inputs)
        if silent is not None:
            silent.post("/v1/score", body)
    ref = sess.run(None, inputs)[0]
    status, content = conn.post("/v1/score", body)
    if status != 200:
        raise RuntimeError(f"gateway answered {status}: {content[:300]!r}")
    diff = float(np.max(np.abs(np.asarray(orjson.loads(content)["scores"]) - ref)))

    def request(client: KeepAliveClient) -> None:
        if client.post("/v1/score", body)[0] != 200:
            raise RuntimeError("the gateway answered an error during the e2e measurement")

    variants = {"e2e": lambda _i: request(conn), "ort": lambda _i: sess.run(None, inputs)}
    if silent is not None:
        variants["e2e_silent"] = lambda _i: request(silent)
    before = gateway_metrics(port)
    samples = interleave(variants, rounds, per_round)
    stages = stage_breakdown(before, gateway_metrics(port))
    for c in (conn, silent):
        if c is not None:
            c.close()
    return {"e2e_ms": samples["e2e"], "ort_ms": samples["ort"], "silent_ms": samples.get("e2e_silent"),
            "stages": stages, "max_abs_diff_vs_ort": diff}


def grouped_feed(inputs: dict[str, np.ndarray], user_names: set[str], users: int, index_input: str,
                 ) -> dict[str, np.ndarray]:
    """The multi-user graph's inputs for ``users`` copies of one request (user rows stacked,
    candidates repeated, ``index_input`` naming each candidate's user row)."""
    b = next(a.shape[0] for name, a in inputs.items() if name not in user_names)
    feed = {name: np.concatenate([a] * users) for name, a in inputs.items()}
    feed[index_input] = np.repeat(np.arange(users, dtype=np.int64), b)
    return feed


class ServingRun(LoadSteps):
    """One ``bench all`` run: the steps share this object's state and add to its figures."""

    def __init__(self, plan: Plan, opts: Options, run_dir: Path | None, log: Log):
        self.plan, self.opts, self.log = plan, opts, log
        self.dist = CandidateDist.parse(opts.candidates)
        self.run_dir = Path(run_dir) if run_dir else None
        self.fig, self.notes = Figures(), []
        self.work = bench_dir() / "all"
        self.models_out: dict[str, Any] | None = None
        self.store_out: dict[str, Any] = {}

    # -- 1. feature store ----------------------------------------------------------------------
    def store(self) -> None:
        """``bench store`` (its own Redis and schema, L = 600, 100 candidates)."""
        from .bench_store import run

        self.store_out = run(rounds=self.plan.store_rounds, per_round=self.plan.store_per_round,
                             record=self.opts.record)

    # -- 2. model, store, pool, the fixed request ----------------------------------------------
    def workload(self) -> None:
        from ctrserve.contract.manifest import Manifest

        self.run_dir = self.run_dir or ensure_run(self.opts.model)
        self.repo = bench_dir() / "model_repository"
        self.batching = self.opts.gateway.batch_max_candidates > 0
        version_dir = ensure_export(self.run_dir, self.repo, self.opts.model, grouped=self.batching)
        self.model_file = version_dir / "model.onnx"
        self.grouped_file = version_dir / "model.grouped.onnx"
        self.redis_url = start_redis(self.launcher, timeout=15).url
        self.pool = build_pool(self.run_dir, version_dir, self.redis_url, baseline=True)
        self.pool_file = self.work / "pool.json"
        self.pool.save(self.pool_file)
        max_b = max(1000, self.dist.max)
        bodies = Bodies(self.pool, max_b, "gateway")
        items = [self.pool.items[i] for i in bodies.order(0)]
        request = asyncio.run(assemble_request(version_dir, self.redis_url, prepared_of(self.run_dir).name,
                                               self.pool.users[0], items, self.pool.contexts[0],
                                               sorted({*BATCHES, max_b}), 50 if self.plan.e2e_rounds > 2 else 20))
        self.inputs, self.full = request.inputs, request.inputs[max_b]
        manifest = Manifest.load(version_dir)
        self.user_names = {t.name for t in manifest.user_inputs}
        self.index_input = manifest.grouped.index_input if manifest.grouped is not None else ""
        seq_names = [f.name for f in manifest.feature_map.sequence_fields]
        self.seq_len = int(self.inputs[100][seq_names[0]].shape[-1]) if seq_names else 0
        self.body100 = bodies.get(0, 100)
        fig, seq_bytes = self.fig, sum(self.inputs[100][n].nbytes for n in seq_names)
        fig.add("component_store_fetch_p50_ms", round(p50(request.fetch_ms), 3), "in-process `online_read` of the "
                "same request (gateway store settings, item cache warm), p50")
        fig.add("component_assembly_p50_ms", round(p50(request.assembly_ms), 3), "in-process assembly of the same "
                "request, p50")
        fig.add("http_request_bytes_b100", len(self.body100), "gateway request body, 100 candidates (raw ids + "
                "context)")
        fig.add("baseline_request_bytes_b100", len(Bodies(self.pool, max_b, "baseline").get(0, 100)), "eager "
                "baseline request body, 100 candidates (encoded features, the sequence once)")
        fig.add("backend_request_bytes_b100", sum(a.nbytes for a in self.inputs[100].values()), "tensor bytes "
                "handed to the backend per request, 100 candidates")
        fig.add("backend_sequence_bytes_b100", seq_bytes, f"of which the user sequence (batch 1, L = {self.seq_len}); "
                f"per candidate it would be {seq_bytes * 100:,} bytes")

    # -- 3. runtimes on the same inputs --------------------------------------------------------
    def models(self) -> None:
        from .bench_models import run_bench

        plan = self.plan
        self.models_out = run_bench(self.run_dir, rounds=plan.models_rounds, per_round=plan.models_per_round,
                                    requests={b: self.inputs[b] for b in BATCHES}, record=self.opts.record,
                                    per_round_large=plan.models_per_round_large, parity_rows=plan.parity_rows)

    # -- 4. FLOPs, peak, profile, raw throughput -----------------------------------------------
    def raw_inference(self) -> None:
        from . import flops

        fig, feed = self.fig, self.inputs[100]
        count = flops.count_flops(self.model_file, feed)
        # the model timed as the peak is (tight loop, 1 thread), interleaved with it round by round
        eff = flops.efficiency(ort_session(self.model_file), feed, count.total)
        events = flops.ort_profile_events(self.model_file, feed, runs=20)
        self.by_op = flops.aggregate_profile(events, 20)
        seq_ms, seq_share = flops.shape_share(events, 20, (100, self.seq_len)) if self.seq_len else (0.0, 0.0)
        self.flops_total = count.total
        fig.add("flops_b100", count.total, f"MatMul/Gemm/Conv/Einsum FLOPs of one 100-candidate request "
                f"({count.nodes} nodes; loadtests/flops.py)")
        fig.add("ort_gflops", round(eff["gflops"], 2), f"flops_b100 / raw ORT p50 at B = 100 in a tight loop, 1 "
                f"thread ({eff['model_p50_ms']:.3f} ms; {eff['rounds']} rounds x {eff['reps']} runs interleaved "
                "with the peak's rounds)")
        fig.add("sgemm_peak_gflops", round(eff["peak_gflops"], 1), "fp32 n x n matmul peak, 1 thread (best of ORT "
                "MatMul and numpy at n = 256, 512, 1024; best of the rounds interleaved with the model's)")
        fig.add("ort_gflops_over_peak", round(eff["ratio"], 4), "ort_gflops / sgemm_peak_gflops (target >= 0.5)")
        fig.add("ort_sequence_x_candidates_share", round(seq_share, 3), f"share of ORT kernel time in nodes with a "
                f"[.., 100, .., {self.seq_len}, ..] output: the sequence broadcast to the candidates inside the graph")
        fig.add("ort_sequence_x_candidates_ms", round(seq_ms, 3), "the same in ms per request (ORT profiler, whose "
                "timing adds overhead)")
        self.sess = ort_session(self.model_file)
        if self.batching:
            self.batched_efficiency(eff)
        # the best of 1 thread, the gateway's inference threads (inline: one per worker; thread: the
        # pools of all workers) and one per core: the target compares with the best raw rate on the
        # machine's cores, which the gateway uses all of (event loop, inference thread, Redis, Locust)
        gateway = self.opts.gateway
        infer_threads = gateway.workers * (1 if gateway.execution == "inline" else gateway.pool_threads)
        self.thr_by = {k: ort_throughput(self.sess, self.full, self.user_names, self.dist, k, self.plan.throughput_s)
                       for k in sorted({1, infer_threads, self.cores})}
        self.thr = max(self.thr_by.values(), key=lambda x: x["candidates_per_s"])
        fig.add("ort_throughput_candidates_per_s", round(self.thr["candidates_per_s"], 1), "raw ORT candidates/s, "
                "best of " + ", ".join(f"{k} thread(s) {v['candidates_per_s']:.0f}" for k, v in self.thr_by.items())
                + f" (threads share one session, as in the gateway; {self.dist} candidates)")

    def batched_efficiency(self, single: dict[str, Any]) -> None:
        """GFLOP/s of the multi-user graph on R users x 100 candidates (R = the batch sizes the
        gateway is likely to form), next to the single-request figure above."""
        from . import flops

        self.batched = {}
        grouped = ort_session(self.grouped_file)
        for r in (2, 4, 8):
            feed = grouped_feed(self.inputs[100], self.user_names, r, self.index_input)
            count = flops.count_flops(self.grouped_file, feed)
            self.batched[r] = flops.efficiency(grouped, feed, count.total, rounds=3, reps=30)
        self.single_eff = single
        # the ceiling of any multi-user graph: one user with R x 100 candidates on the single-user
        # graph (user-side work once, every candidate's work as in R requests), against R calls of 100
        feeds = {str(n): {k: a if k in self.user_names else a[:n] for k, a in self.full.items()}
                 for n in (100, 200, 400, 800)}
        times = interleave({n: (lambda _i, f=f: self.sess.run(None, f)) for n, f in feeds.items()}, 5, 20)
        self.ideal = {r: p50(times[str(100 * r)]) / (r * p50(times["100"])) for r in (2, 4, 8)}
        self.log("    multi-user graph GFLOP/s over peak: " + ", ".join(
            f"R={r}: {e['ratio']:.3f}" for r, e in self.batched.items()) + f" (single request {single['ratio']:.3f})")

    # -- 5. gateway end to end, interleaved with raw ORT ---------------------------------------
    def e2e(self) -> None:
        gateway, fig = self.opts.gateway, self.fig
        self.gw = gateway.start(self.launcher, self.repo, self.redis_url)
        # the same gateway with the closed loop off, for the impression log's cost (same run, interleaved)
        silent = gateway.start(self.launcher, self.repo, self.redis_url, name="gateway-silent",
                               env={"CTRSERVE_FEEDBACK_ENABLED": "false"})
        e2e = e2e_interleaved(self.gw.port, self.body100, self.sess, self.inputs[100], self.plan.e2e_rounds,
                              self.plan.e2e_per_round, silent_port=silent.port)
        self.launcher.stop(silent.child)
        self.e2e_ms = e2e["e2e_ms"]
        e2e_p50, ort_p50, silent_p50 = p50(e2e["e2e_ms"]), p50(e2e["ort_ms"]), p50(e2e["silent_ms"])
        fig.add("impression_log_overhead_ms", round(e2e_p50 - silent_p50, 3), f"e2e p50 with the impression log "
                f"({e2e_p50:.3f} ms) minus the same gateway with CTRSERVE_FEEDBACK_ENABLED=false ({silent_p50:.3f} "
                "ms), one sequential client interleaved between them")
        mean = {k: v["mean_ms"] for k, v in e2e["stages"].items()}
        in_app = mean.get("request_in_app", math.nan)
        stage_sum = sum(mean.get(k, 0.0) for k in ("route", "feature_fetch", "assembly", "inference"))
        e2e_mean, ort_mean = float(np.mean(e2e["e2e_ms"])), float(np.mean(e2e["ort_ms"]))
        fig.add("e2e_p50_ms", round(e2e_p50, 3), "gateway end to end, one client, sequential, 100 candidates, p50 "
                "(HTTP request to the answer's last byte; keep-alive raw-socket client, loadtests/stack.py)")
        fig.add("e2e_p99_ms", round(percentiles(np.asarray(e2e["e2e_ms"]), (99,))[0], 3), "same, p99")
        fig.add("ort_p50_ms", round(ort_p50, 3), "raw ONNX Runtime in-process on the same assembled inputs, 1 "
                "intra-op thread, interleaved with the e2e requests, p50")
        fig.add("e2e_over_ort_p50", round(e2e_p50 / ort_p50, 3), "e2e p50 / raw ORT p50 (target <= 1.30)")
        fig.add("e2e_minus_ort_p50_ms", round(e2e_p50 - ort_p50, 3), "what the service adds on top of the model, p50")
        for key, label in (("feature_fetch", "feature fetch (one Redis round trip + decode)"),
                           ("assembly", "assembly (feature map -> tensors)"),
                           ("inference", f"inference (ORT, {gateway.execution} execution)"), ("route", "A/B routing")):
            if key in mean:
                fig.add(f"layer_{key}_mean_ms", round(mean[key], 3), f"gateway stage mean over the e2e requests: "
                        f"{label}")
        fig.add("layer_http_json_in_app_mean_ms", round(in_app - stage_sum, 3), "in the app but outside the "
                "stages: body parsing/validation, response JSON, middleware, metrics")
        fig.add("layer_network_server_client_mean_ms", round(e2e_mean - in_app, 3), "client-measured mean - in-app "
                "mean: loopback TCP, uvicorn/httptools, the client")
        fig.add("layer_thread_hop_mean_ms", round(mean.get("inference", math.nan) - ort_mean, 3), "inference stage "
                "mean - raw ORT mean: thread hand-off and wait (thread execution), cache effects of the request's "
                "other work (both)")
        fig.add("gateway_scores_max_abs_diff_vs_ort", e2e["max_abs_diff_vs_ort"], "|gateway scores - raw ORT on the "
                "assembled inputs|: proves the inputs are the same")
        fig.add("ort_gflops_e2e_interleaved", round(self.flops_total / (ort_p50 / 1e3) / 1e9, 2), "flops_b100 / "
                "ort_p50_ms (ORT timed between gateway requests, as the e2e ratio uses it)")
        self.notes.append("Layer costs (means, ms, over the sequential e2e requests): " + ", ".join(
            f"{k} {v['mean_ms']:.2f}" for k, v in e2e["stages"].items()) + f"; client e2e {e2e_mean:.2f}; raw ORT "
            f"{ort_mean:.2f}.")

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from ctrserve.paths import REPO_ROOT

        t_start, opts = time.time(), self.opts
        self.cores = os.cpu_count() or 1
        facts = machine_facts(**self.versions())
        self.log(f"[bench all] start, load average {facts.get('load_avg_1m')}")
        self.img_dir = REPO_ROOT / "docs" / "img" if opts.record else self.work
        with Launcher(self.work) as self.launcher:
            run_steps("bench all", [
                ("feature store fetch", self.store), ("model, export, Redis, traffic pool", self.workload),
                *([("runtimes: eager, TorchScript, ORT, Triton at B = 1, 100, 1000", self.models)]
                  if opts.with_triton else []),
                ("FLOPs, fp32 matmul peak, ORT profile, raw ORT throughput", self.raw_inference),
                ("gateway end to end vs raw ORT (B = 100)", self.e2e),
                ("Locust: saturation steps, soak", self.load_gateway),
                ("eager FastAPI baseline under the same Locust load", self.baseline)], self.log)
        self.finish(facts, t_start)
        if opts.record and self.batching:  # beside the default run's section, not over it
            g = opts.gateway
            self.notes.insert(0, "Figure names: those of the `serving` section with the prefix `batched_`, and the "
                                 "batching figures (mean batch, queue wait, the multi-user graph's cost).")
            self.fig.renamed(lambda k: k if k in BATCHING_FIGURES else f"batched_{k}").record(
                BATCHED_SECTION, "Serving with cross-request batching: the same run with the gateway's batcher on",
                f"ctrserve bench all --batch-max-candidates {g.batch_max_candidates} --batch-max-wait-ms "
                f"{g.batch_max_wait_ms:g}", self.notes, facts)
        elif opts.record:
            self.fig.record(SECTION, "Serving: end to end vs raw inference, saturation, soak, baseline",
                            "ctrserve bench all", self.notes, facts)
        return {"figures": self.fig.values(), "steps": self.steps, "notes": self.notes}

    def versions(self) -> dict[str, str]:
        import onnxruntime

        from ctrserve.export.runtimes import torch_facts

        torch = torch_facts()  # never import locust here: it monkey-patches threads (gevent)
        return {"torch": torch["torch"], "onnxruntime": onnxruntime.__version__, "locust": version("locust"),
                "fastapi": version("fastapi"), "uvicorn": version("uvicorn"),
                "threads": f"{self.opts.gateway.describe()}; raw ORT: intra-op 1; torch: {torch['torch_threads']} "
                           "(eager baseline: torch default)"}


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
    batch_max_candidates: Annotated[int, typer.Option(
        help="cross-request batching: candidates per call (CTRSERVE_BACKEND_BATCH_MAX_CANDIDATES; 0: off)")] = 0,
    batch_max_wait_ms: Annotated[float, typer.Option(
        help="cross-request batching: longest wait of a queued request (CTRSERVE_BACKEND_BATCH_MAX_WAIT_MS)")] = 0.2,
    triton: Annotated[bool, typer.Option(help="run the runtime comparison (bench models, incl. Triton)")] = True,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json, .md and docs/img (--no-record: a "
                                              "trial run that leaves docs/ alone)")] = True,
) -> None:
    """Regenerate every serving benchmark in one run -> docs/benchmarks.md and docs/benchmarks.json."""
    from rich.console import Console

    console = Console()
    plan = Plan.quick(soak) if quick else Plan(soak_s=soak if soak is not None else 300)
    with failing_as_exit(console):
        opts = Options(model, candidates, GatewaySetup(workers, pool_threads, execution, batch_max_candidates,
                                                           batch_max_wait_ms), with_triton=triton,
                       record=record)
        out = ServingRun(plan, opts, run_dir, console_log(console)).run()
    console.print(out["figures"])
    for line in out["notes"][:5]:
        console.print(line)
