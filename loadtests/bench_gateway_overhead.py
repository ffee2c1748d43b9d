"""Where the gateway's time goes on top of raw ONNX Runtime, measured on one noisy machine
(``ctrserve bench gateway``; prints figures, ``--json`` writes them; records nothing in docs/).

One process run, MGDIN, the benchmark's fixed 100-candidate request, a private redis-server:

1. ``parse``: the request body of 100 candidates through FastAPI's way (stdlib ``json`` + pydantic
   on the dict), orjson + ``model_validate``, and ``model_validate_json``.
2. ``middleware``: the per-request metric updates and one JSON access-log line.
3. ``deps``: a FastAPI route with two ``def`` dependencies (run in FastAPI's thread pool) vs two
   ``async def`` ones.
4. ``hop``: ``await``-ing ONNX Runtime through an executor vs calling it directly — one shared
   session with 1 or 2 threads, one session per thread, intra-op 2 with spinning off / on —
   sequential p50 (interleaved rounds) and candidates/s with 4 concurrent callers.
5. ``cpu``: the gateway's own CPU per request (in-process app, inline execution, the model
   call answered from memory): the Python on top of inference, robust to a busy machine; and,
   interleaved, the same Python's CPU with the real model call in between (counted apart), and
   the model call's CPU inside requests against back to back: what each costs the other.
6. ``asgi``: the whole app called in-process (no HTTP), interleaved with raw ORT, with the stage
   means from its metrics, and raw ORT run right after each request (the caches a request leaves);
   the event loop's CPU per request with the scoring fast path (the default) and through the
   FastAPI route it bypasses, interleaved. The stage means cover both.
7. ``e2e``: gateway subprocesses (``ctrserve serve``), one per configuration, each measured with
   sequential requests interleaved with raw ORT runs on the same inputs: the ratio e2e p50 / ORT p50
   (target <= 1.25) holds on a busy machine because both see the same noise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .stats import percentiles

SECTIONS = ("parse", "middleware", "deps", "hop", "cpu", "asgi", "e2e")

#: gateway configurations measured end to end: name -> environment overrides
E2E_VARIANTS: dict[str, dict[str, str]] = {
    "pool 2, access log": {"CTRSERVE_BACKEND_POOL_THREADS": "2", "CTRSERVE_SERVER_ACCESS_LOG": "true"},
    "pool 1, access log": {"CTRSERVE_BACKEND_POOL_THREADS": "1", "CTRSERVE_SERVER_ACCESS_LOG": "true"},
    "pool 1, no access log": {"CTRSERVE_BACKEND_POOL_THREADS": "1", "CTRSERVE_SERVER_ACCESS_LOG": "false"},
    "defaults": {},
    "inline": {"CTRSERVE_BACKEND_EXECUTION": "inline"},
    "inline, no access log": {"CTRSERVE_BACKEND_EXECUTION": "inline", "CTRSERVE_SERVER_ACCESS_LOG": "false"},
    "inline, no early read": {"CTRSERVE_BACKEND_EXECUTION": "inline", "CTRSERVE_STORE_EARLY_READ": "false"},
    "auto": {"CTRSERVE_BACKEND_EXECUTION": "auto"},
    "thread": {"CTRSERVE_BACKEND_EXECUTION": "thread"},
    "inline, 2 workers": {"CTRSERVE_BACKEND_EXECUTION": "inline", "CTRSERVE_SERVER_WORKERS": "2"},
    "thread, 2 workers": {"CTRSERVE_BACKEND_EXECUTION": "thread", "CTRSERVE_SERVER_WORKERS": "2"},
    "intra-op 2, spinning off": {"CTRSERVE_BACKEND_ORT_INTRA_OP_THREADS": "2",
                                 "CTRSERVE_BACKEND_ORT_SPINNING": "false"},
}


def _p50(xs: list[float]) -> float:
    return percentiles(np.asarray(xs), (50,))[0]


def _session(path: Path, intra: int = 1, spin: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()  # as the gateway's backend
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# -- 1. parsing ------------------------------------------------------------------------------
def bench_parse(body: bytes, reps: int) -> dict[str, float]:
    """p50 µs per body for each way of turning the bytes into a validated ScoreRequest."""
    import orjson

    from ctrserve.service.api import ScoreRequest

    ways = {
        "fastapi: json.loads + validate_python": lambda: ScoreRequest.model_validate(json.loads(body),
                                                                                     from_attributes=True),
        "orjson.loads + model_validate": lambda: ScoreRequest.model_validate(orjson.loads(body)),
        "model_validate_json": lambda: ScoreRequest.model_validate_json(body),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps):
        for name, fn in ways.items():  # interleaved
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e6)
    return {k: round(_p50(v), 1) for k, v in times.items()}


# -- 2. middleware ---------------------------------------------------------------------------
def bench_middleware(reps: int) -> dict[str, float]:
    """p50 µs of the metric updates one scoring request makes, and of one JSON access-log line."""
    from ctrserve.service.logs import JsonFormatter
    from ctrserve.service.metrics import STAGES, Metrics

    m = Metrics()
    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115 - lives as long as the run
    handler.setFormatter(JsonFormatter())
    lg = logging.getLogger("bench.access")
    lg.handlers[:] = [handler]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    met, logt = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        m.candidates.observe(100)
        for s in STAGES:
            m.stage.labels(s, "default").observe(0.001)
        m.store_lookups.labels("user", "hit").inc()
        m.store_lookups.labels("item", "hit").inc(100)
        m.item_cache.labels("hit").inc(100)
        m.requests.labels("/v1/score", "default", "200").inc()
        m.latency.labels("/v1/score", "default", "200").observe(0.01)
        t1 = time.perf_counter()
        lg.info("request", extra={"method": "POST", "path": "/v1/score", "status": 200, "ms": 12.3, "arm": "default"})
        t2 = time.perf_counter()
        met.append((t1 - t0) * 1e6)
        logt.append((t2 - t1) * 1e6)
    return {"metrics (all updates of one request)": round(_p50(met), 1), "access log line": round(_p50(logt), 1)}


# -- 2b. FastAPI dependencies: plain def (run in a thread pool) vs async def --------------------
async def _deps(reps: int) -> dict[str, float]:
    """p50 µs of one in-process request to a FastAPI route with two trivial dependencies, as
    ``def`` (FastAPI hands each to its thread pool) and as ``async def`` (run on the loop)."""
    from fastapi import Depends, FastAPI, Request

    def sync_dep(request: Request) -> int:
        return 1

    def sync_dep2(request: Request, x: int = Depends(sync_dep)) -> None:
        return None

    async def async_dep(request: Request) -> int:
        return 1

    async def async_dep2(request: Request, x: int = Depends(async_dep)) -> None:
        return None

    app = FastAPI()

    @app.post("/sync", dependencies=[Depends(sync_dep2)])
    async def with_sync(x: int = Depends(sync_dep)) -> dict:
        return {}

    @app.post("/async", dependencies=[Depends(async_dep2)])
    async def with_async(x: int = Depends(async_dep)) -> dict:
        return {}

    async def call(path: str) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            return None

        await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                   "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                   "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}, receive, send)

    times: dict[str, list[float]] = {"def dependencies (thread pool)": [], "async def dependencies": []}
    for _ in range(reps):
        for name, path in (("def dependencies (thread pool)", "/sync"), ("async def dependencies", "/async")):
            t0 = time.perf_counter()
            await call(path)
            times[name].append((time.perf_counter() - t0) * 1e6)
    return {k: round(_p50(v), 1) for k, v in times.items()}


# -- 3. the thread-pool hop ------------------------------------------------------------------
class _Runner:
    """One way to run inference from the event loop."""

    def __init__(self, name: str, path: Path, pool_threads: int | None, per_thread: bool = False, intra: int = 1,
                 spin: bool = True, workers: bool = False):
        from ctrserve.service.backends.onnxruntime import Workers

        self.name = name
        self.pool = ThreadPoolExecutor(pool_threads, thread_name_prefix="bench") if pool_threads else None
        # the gateway's own hand-off (queue + call_soon_threadsafe) instead of the executor
        self.workers = Workers(self, pool_threads or 1, "bench-workers") if workers else None
        self.path, self.intra, self.spin = path, intra, spin
        self.per_thread = per_thread
        self.shared = None if per_thread else _session(path, intra, spin)
        self.local = threading.local()

    def _sess(self) -> Any:
        if not self.per_thread:
            return self.shared
        s = getattr(self.local, "sess", None)
        if s is None:
            s = self.local.sess = _session(self.path, self.intra, self.spin)
        return s

    def _run(self, feed: dict[str, np.ndarray]) -> Any:
        return self._sess().run(None, feed)[0]

    async def __call__(self, feed: dict[str, np.ndarray]) -> Any:
        if self.workers is not None:
            return await self.workers.submit(self._run, feed)
        if self.pool is None:
            return self._run(feed)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, feed)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.workers is not None:
            self.workers.close()


def hop_runners(path: Path) -> list[_Runner]:
    return [
        _Runner("direct on the loop (reference)", path, None),
        _Runner("shared session, pool 2 (old default)", path, 2),
        _Runner("shared session, executor of 1 thread (before)", path, 1),
        _Runner("shared session, 1 worker thread (gateway)", path, 1, workers=True),
        _Runner("shared session, 2 worker threads (gateway default)", path, 2, workers=True),
        _Runner("session per thread, pool 2", path, 2, per_thread=True),
        _Runner("intra-op 2 spinning off, pool 1", path, 1, intra=2, spin=False),
        _Runner("intra-op 2 spinning on, pool 1", path, 1, intra=2, spin=True),
    ]


async def _hop(runners: list[_Runner], feed: dict[str, np.ndarray], rounds: int, per_round: int,
               concurrency: int, seconds: float, b: int) -> dict[str, dict[str, float]]:
    for r in runners:  # warm every thread's session
        await asyncio.gather(*(r(feed) for _ in range(4)))
    seq: dict[str, list[float]] = {r.name: [] for r in runners}
    loop_cpu = {r.name: 0.0 for r in runners}  # the event loop thread's CPU (all of ORT when run directly)
    for _ in range(rounds):
        for r in runners:
            c0 = time.thread_time()
            for _ in range(per_round):
                t0 = time.perf_counter()
                await r(feed)
                seq[r.name].append((time.perf_counter() - t0) * 1e3)
            loop_cpu[r.name] += time.thread_time() - c0
    out: dict[str, dict[str, float]] = {}
    ref = _p50(seq[runners[0].name])
    for r in runners:
        stop = time.monotonic() + seconds
        done = 0

        async def worker(r: _Runner = r, stop: float = stop) -> None:
            nonlocal done
            while time.monotonic() < stop:
                await r(feed)
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
        p50 = _p50(seq[r.name])
        out[r.name] = {"p50_ms": round(p50, 3), "over_direct": round(p50 / ref, 3),
                       "loop_cpu_us_per_call": round(loop_cpu[r.name] * 1e6 / len(seq[r.name]), 1),
                       "candidates_per_s": round(done * b / wall, 0)}
    return out


# -- 3b. the app in-process (no HTTP server, no client) ---------------------------------------
def _in_process_app(repo: Path, redis_url: str, body: bytes, access_log: bool = False,
                    execution: str | None = None) -> tuple[Any, Any]:
    """The gateway app (defaults unless given, private Redis) and ``call()``: one POST /v1/score
    of ``body`` through the whole ASGI app, no HTTP; returns the status code."""
    from ctrserve.service.app import create_app
    from ctrserve.service.features import gateway_store_config, redis_factory
    from ctrserve.service.settings import BackendSettings, GatewaySettings, ServerSettings

    settings = GatewaySettings.from_env(server=ServerSettings(access_log=access_log),
                                        backend=BackendSettings(model_repository=repo,
                                                                **({"execution": execution} if execution else {})))
    app = create_app(settings, redis_factory(gateway_store_config(100.0, url=redis_url)))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": app}

    async def call() -> int:
        sent = [False]
        status = [0]

        async def receive() -> dict:
            if sent[0]:
                await asyncio.sleep(3600)
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        await app(dict(scope), receive, send)
        return status[0]

    return app, call


async def _cpu(repo: Path, redis_url: str, body: bytes, batches: int, per_batch: int) -> dict[str, float]:
    """The gateway's own CPU per scoring request: the in-process app (inline execution) with the
    model call answering its first result again, so what is left is the Python around inference —
    parsing, validation, routing, the Redis client and decoding, assembly, response, metrics — but
    not the wait for Redis (thread CPU time) nor the access-log line (the ``middleware`` section).
    The least CPU of ``batches`` batches (a busy machine only adds), and the median.

    Interleaved with those batches, the same requests with the real model call, whose own thread
    CPU is counted apart: the same Python then costs more, because each ONNX Runtime run (weights
    and activations of a few MB) leaves the core's caches cold for it, and the model call inside
    a request costs more than back to back (measured here too, same session, same inputs)."""
    from ctrserve.service.app import wait_ready

    app, call = _in_process_app(repo, redis_url, body, execution="inline")
    per_req, with_model, with_sweep, model_in_request, model_back_to_back = [], [], [], [], []
    async with app.router.lifespan_context(app):
        await wait_ready(app, 120)
        if await call() != 200:
            raise RuntimeError("in-process app did not answer 200")
        loaded_models = list(app.state.gateway.registry.loaded.values())
        model_cpu = [0.0]  # thread CPU inside the model call (counted apart from the Python around it)
        last_call: list[Any] = []

        def counted(run: Any) -> Any:
            def call_counted(inputs: dict[str, np.ndarray]) -> Any:
                c = time.thread_time()
                try:
                    return run(inputs)
                finally:
                    model_cpu[0] += time.thread_time() - c
                    last_call[:] = [(run, inputs)]
            return call_counted

        # the mechanism, checked: a stub that first reads a buffer as large as the model's weights
        # (the ONNX file) — no arithmetic worth the name, only the cache footprint (counted apart)
        sweep = np.ones(max(1, max(lo.backend.path.stat().st_size for lo in loaded_models) // 4), dtype=np.float32)
        runs: dict[str, list[Any]] = {"stub": [], "real": [], "sweep": []}
        for loaded in loaded_models:
            real = loaded.backend._run
            first = real(loaded.assembler.warmup_inputs(100))  # the body has 100 candidates
            runs["stub"].append(lambda inputs, first=first: first)
            runs["real"].append(counted(real))
            runs["sweep"].append(counted(lambda _inputs, first=first: (sweep.sum(), first)[1]))

        async def python_cpu_us(kind: str) -> float:
            """Thread CPU per request outside the model call, each model answering with ``runs[kind]``."""
            for loaded, run in zip(loaded_models, runs[kind], strict=True):
                loaded.backend._run = run
            model_cpu[0] = 0.0
            c0 = time.thread_time()
            for _ in range(per_batch):
                await call()
            return (time.thread_time() - c0 - model_cpu[0]) / per_batch * 1e6

        await python_cpu_us("stub")
        for _ in range(batches):
            per_req.append(await python_cpu_us("stub"))
            with_model.append(await python_cpu_us("real"))
            model_in_request.append(model_cpu[0] / per_batch * 1e6)
            run, inputs = last_call[0]
            c0 = time.thread_time()
            for _ in range(per_batch):
                run(inputs)
            model_back_to_back.append((time.thread_time() - c0) / per_batch * 1e6)
            with_sweep.append(await python_cpu_us("sweep"))
    return {"gateway_cpu_us_per_request_min": round(min(per_req), 1),
            "gateway_cpu_us_per_request_median": round(float(np.median(per_req)), 1),
            "gateway_cpu_us_per_request_with_model_median": round(float(np.median(with_model)), 1),
            "gateway_cpu_us_per_request_with_cache_sweep_median": round(float(np.median(with_sweep)), 1),
            "cache_sweep_bytes": int(sweep.nbytes),
            "model_cpu_us_in_request_median": round(float(np.median(model_in_request)), 1),
            "model_cpu_us_back_to_back_median": round(float(np.median(model_back_to_back)), 1)}


async def _asgi(repo: Path, redis_url: str, body: bytes, sess: Any, feed: dict[str, np.ndarray], rounds: int,
                per_round: int) -> dict[str, float]:
    """The whole app called as an ASGI callable (middleware, routing, parsing, store, assembly,
    inference hop, response) interleaved with raw ORT: the gateway's own cost without HTTP."""
    from ctrserve.service.app import wait_ready

    app, call = _in_process_app(repo, redis_url, body)

    from prometheus_client import generate_latest

    from .stats import parse_prometheus, stage_breakdown

    def snap() -> Any:
        return parse_prometheus(generate_latest(app.state.gateway.metrics.registry).decode())

    a, o = [], []
    async with app.router.lifespan_context(app):
        await wait_ready(app, 120)
        for _ in range(10):
            if await call() != 200:
                raise RuntimeError("in-process app did not answer 200")
        # time the ORT call inside the gateway's executor thread: inference stage minus this = the hop
        runs: list[float] = []
        for loaded in app.state.gateway.registry.loaded.values():
            inner = loaded.backend._run

            def timed(inputs: dict[str, np.ndarray], inner: Any = inner) -> Any:
                t0 = time.perf_counter()
                try:
                    return inner(inputs)
                finally:
                    runs.append((time.perf_counter() - t0) * 1e3)

            loaded.backend._run = timed
        mw = app.gateway_middleware()
        before = snap()
        first_run = len(runs)
        alt: list[float] = []  # raw ORT right after each request: the caches a request leaves behind
        # CPU of this (the event loop's) thread per request: robust to a busy machine. The scoring
        # fast path (the default) and the FastAPI route it bypasses, interleaved
        loop_cpu = {True: 0.0, False: 0.0}
        via_fastapi: list[float] = []
        for _ in range(rounds):
            for fast, times in ((True, a), (False, via_fastapi)):
                mw.fast_score = fast
                c0 = time.thread_time()
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    await call()
                    times.append((time.perf_counter() - t0) * 1e3)
                loop_cpu[fast] += time.thread_time() - c0
            mw.fast_score = True
            for _ in range(per_round):
                t0 = time.perf_counter()
                sess.run(None, feed)
                o.append((time.perf_counter() - t0) * 1e3)
        stages = stage_breakdown(before, snap())
        in_thread = float(np.mean(runs[first_run:]))
        for _ in range(rounds * per_round // 2):
            await call()
            t0 = time.perf_counter()
            sess.run(None, feed)
            alt.append((time.perf_counter() - t0) * 1e3)
    pa, po = _p50(a), _p50(o)
    return {"app_p50_ms": round(pa, 3), "ort_p50_ms": round(po, 3), "app_over_ort_p50": round(pa / po, 3),
            "app_minus_ort_ms": round(pa - po, 3), "app_mean_ms": round(float(np.mean(a)), 3),
            "ort_mean_ms": round(float(np.mean(o)), 3), "ort_after_each_request_mean_ms": round(float(np.mean(alt)), 3),
            "ort_run_in_gateway_thread_mean_ms": round(in_thread, 3),
            "event_loop_cpu_ms_per_req": round(loop_cpu[True] * 1e3 / len(a), 3),
            "fastapi_route_p50_ms": round(_p50(via_fastapi), 3),
            "fastapi_route_event_loop_cpu_ms_per_req": round(loop_cpu[False] * 1e3 / len(via_fastapi), 3),
            **{f"{k}_mean_ms": round(v["mean_ms"], 3) for k, v in stages.items()}}


# -- 4. end to end -----------------------------------------------------------------------------
def _sched(pid: int) -> dict[str, tuple[int, int]]:
    """CPU ns and run-queue wait ns of each thread of ``pid`` (``/proc/<pid>/task/*/schedstat``),
    keyed ``name/tid``. On a machine busy with other jobs the wall-clock ratio mixes the gateway's
    own work with waiting for a core; these two separate them."""
    out: dict[str, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):  # the thread exited meanwhile, or no schedstat in this kernel
            continue
        out[f"{name}/{task.name}"] = (int(run_ns), int(wait_ns))
    return out


def _sched_delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], n: int, prefix: str
                 ) -> dict[str, float]:
    """Per request (``n``): CPU ms and run-queue wait ms of the whole process and of its busiest
    threads (the event loop, the inference executor)."""
    out: dict[str, float] = {}
    tot_run = tot_wait = 0.0
    per: list[tuple[float, float, str]] = []
    for k, (run_ns, wait_ns) in after.items():
        r0, w0 = before.get(k, (0, 0))
        dr, dw = (run_ns - r0) / 1e6 / n, (wait_ns - w0) / 1e6 / n
        tot_run += dr
        tot_wait += dw
        per.append((dr, dw, k))
    out[f"{prefix}_cpu_ms_per_req"] = round(tot_run, 3)
    out[f"{prefix}_runqueue_wait_ms_per_req"] = round(tot_wait, 3)
    for dr, dw, name in sorted(per, reverse=True)[:3]:
        out[f"{prefix}_thread[{name}]_cpu_ms_per_req"] = round(dr, 3)
        out[f"{prefix}_thread[{name}]_wait_ms_per_req"] = round(dw, 3)
    return out


def _thread_sched() -> tuple[int, int]:
    run_ns, wait_ns, _ = Path("/proc/thread-self/schedstat").read_text().split()
    return int(run_ns), int(wait_ns)


def e2e(port: int, body: bytes, sess: Any, feed: dict[str, np.ndarray], rounds: int, per_round: int,
        pids: dict[str, int] | None = None) -> dict[str, float]:
    """Sequential requests interleaved with raw ORT runs. ``pids`` (name -> pid: the gateway,
    redis-server) adds their CPU and run-queue wait per request, and the same for raw ORT."""
    from .stack import KeepAliveClient

    conn = KeepAliveClient(port)
    for _ in range(10):
        status, content = conn.post("/v1/score", body)
        if status != 200:
            raise RuntimeError(f"gateway answered {status}: {content[:300]!r}")
        sess.run(None, feed)
    from .bench_all import _metrics
    from .stats import stage_breakdown

    before = _metrics(port)
    pids = pids or {}
    sched0 = {k: _sched(p) for k, p in pids.items()}
    client = [0, 0]
    ort = [0, 0]
    e, o = [], []
    for _ in range(rounds):
        c0 = _thread_sched()
        for _ in range(per_round):
            t0 = time.perf_counter()
            status, _ = conn.post("/v1/score", body)
            e.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise RuntimeError(f"gateway answered {status}")
        c1 = _thread_sched()
        for _ in range(per_round):
            t0 = time.perf_counter()
            sess.run(None, feed)
            o.append((time.perf_counter() - t0) * 1e3)
        c2 = _thread_sched()
        client = [client[0] + c1[0] - c0[0], client[1] + c1[1] - c0[1]]
        ort = [ort[0] + c2[0] - c1[0], ort[1] + c2[1] - c1[1]]
    sched1 = {k: _sched(p) for k, p in pids.items()}
    conn.close()
    stages = stage_breakdown(before, _metrics(port))
    pe, po = _p50(e), _p50(o)
    n = rounds * per_round
    cpu: dict[str, float] = {}
    if pids:
        cpu = {"ort_cpu_ms_per_run": round(ort[0] / 1e6 / n, 3),
               "ort_runqueue_wait_ms_per_run": round(ort[1] / 1e6 / n, 3),
               "client_cpu_ms_per_req": round(client[0] / 1e6 / n, 3),
               "client_runqueue_wait_ms_per_req": round(client[1] / 1e6 / n, 3)}
        for k in pids:
            cpu.update(_sched_delta(sched0[k], sched1[k], n, k))
    return {"e2e_p50_ms": round(pe, 3), "ort_p50_ms": round(po, 3), "e2e_over_ort_p50": round(pe / po, 3),
            "e2e_minus_ort_ms": round(pe - po, 3), "e2e_mean_ms": round(float(np.mean(e)), 3),
            "ort_mean_ms": round(float(np.mean(o)), 3),
            **{f"{k}_mean_ms": round(v["mean_ms"], 3) for k, v in stages.items()}, **cpu}


def e2e_throughput(port: int, body: bytes, clients: int, seconds: float, b: int) -> dict[str, float]:
    """Candidates/s with ``clients`` keep-alive connections posting back to back (client threads)."""
    stop = time.monotonic() + seconds
    done = [0] * clients
    errors = [0] * clients

    from .stack import KeepAliveClient

    def work(k: int) -> None:
        conn = KeepAliveClient(port)
        while time.monotonic() < stop:
            status, _ = conn.post("/v1/score", body)
            done[k] += status == 200
            errors[k] += status != 200
        conn.close()

    from .bench_all import run_threads

    wall = run_threads(work, clients)
    return {f"candidates_per_s_{clients}_clients": round(sum(done) * b / wall, 0), "errors": sum(errors)}


def run(sections: set[str], rounds: int, per_round: int, variants: list[str] | None = None,
        log: Any = print) -> dict[str, Any]:
    from ctrserve.contract.manifest import Manifest

    from .bench_all import _assemble
    from .run_load import bench_dir, build_pool, ensure_export, ensure_run, prepared_of
    from .stack import Stack, free_port, http_get, wait_for
    from .traffic import Bodies

    out: dict[str, Any] = {}
    run_dir = ensure_run("mgdin")
    repo = bench_dir() / "model_repository"
    version_dir = ensure_export(run_dir, repo, "mgdin")
    model_file = version_dir / "model.onnx"
    work = bench_dir() / "gateway_overhead"
    with Stack(work) as stack:
        redis_url = stack.redis()
        pool = build_pool(run_dir, version_dir, redis_url, 50)
        bodies = Bodies(pool, 100, "gateway")
        body = bodies.get(0, 100)
        items = [pool.items[i] for i in bodies.order(0)]
        comp = asyncio.run(_assemble(version_dir, redis_url, prepared_of(run_dir).name, pool.users[0], items,
                                     pool.contexts[0], [100], 5))
        feed = comp["inputs"][100]
        assert Manifest.load(version_dir).name == "mgdin"
        if "parse" in sections:
            out["parse_us_p50"] = bench_parse(body, rounds * per_round)
            log(f"parse (µs p50, body of 100 candidates, {len(body)} bytes):", out["parse_us_p50"])
        if "middleware" in sections:
            out["middleware_us_p50"] = bench_middleware(rounds * per_round)
            log("middleware (µs p50):", out["middleware_us_p50"])
        if "deps" in sections:
            out["fastapi_deps_us_p50"] = asyncio.run(_deps(rounds * per_round))
            log("FastAPI route with 2 dependencies (µs p50):", out["fastapi_deps_us_p50"])
        if "hop" in sections:
            runners = hop_runners(model_file)
            out["hop"] = asyncio.run(_hop(runners, feed, rounds, per_round, 4, 3.0, 100))
            for r in runners:
                r.close()
            for k, v in out["hop"].items():
                log(f"hop  {k:48s} {v}")
        if "cpu" in sections:
            out["cpu"] = asyncio.run(_cpu(repo, redis_url, body, 20, max(50, per_round * 10)))
            log("cpu (gateway's own CPU per request: model call answered from memory; with the real model, "
                "counted apart):", out["cpu"])
        if "asgi" in sections:
            out["asgi"] = asyncio.run(_asgi(repo, redis_url, body, _session(model_file), feed, rounds, per_round))
            log("asgi (app in-process):", out["asgi"])
        if "e2e" in sections:
            sess = _session(model_file)
            out["e2e"] = {}
            for name in variants or list(E2E_VARIANTS):
                port = free_port()
                env = {"CTRSERVE_BACKEND_MODEL_REPOSITORY": str(repo), "CTRSERVE_REDIS_URL": redis_url,
                       "CTRSERVE_SERVER_PORT": str(port), "CTRSERVE_SERVER_LOG_LEVEL": "info",
                       **E2E_VARIANTS[name]}
                proc = stack.spawn("gateway", [sys.executable, "-m", "ctrserve", "serve"], env=env,
                                   log=work / "gateway.log")
                wait_for(lambda port=port: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 180,
                         "the gateway", proc, work / "gateway.log")
                pids = {"gateway": proc.pid, **{n: p.pid for n, p in stack.procs if n == "redis"}}
                out["e2e"][name] = {**e2e(port, body, sess, feed, rounds, per_round, pids),
                                    **e2e_throughput(port, body, 4, 5.0, 100)}
                log(f"e2e  {name:30s} {out['e2e'][name]}")
                stack.stop(proc)
    return out


def gateway_cmd(
    sections: str = typer.Option(",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}"),
    rounds: int = typer.Option(5, min=1, help="interleaved measuring rounds"),
    per_round: int = typer.Option(40, min=1, help="requests (and raw ORT runs) per round"),
    variant: list[str] = typer.Option(None, help=f"e2e gateway configurations (default: all of {list(E2E_VARIANTS)})"),
    json_out: Path = typer.Option(None, "--json", help="also write the figures to this file"),
) -> None:
    """What the gateway adds on top of raw ONNX Runtime (MGDIN, 100 candidates), part by part."""
    chosen = set(sections.split(","))
    bad = chosen - set(SECTIONS) or set(variant or []) - set(E2E_VARIANTS)
    if bad:
        raise typer.BadParameter(f"unknown section or variant: {sorted(bad)}")
    out = run(chosen, rounds, per_round, variant or None)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    typer.run(gateway_cmd)
