"""The Locust steps of ``ctrserve bench all`` and the figures that combine steps: the saturation
search, the soak at half its rate with the queueing bound of ideal servers on the soak's own send
times, the eager FastAPI baseline under the same load, the plots, the verdicts on the targets and
the notes."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from . import stats
from .harness import load_average
from .load import LoadResult, measure, plot_run, plot_saturation
from .stack import gateway_metrics, start_baseline
from .stats import Sample, fifo_responses, load_samples, percentiles, saturation

MAX_USERS = 64
#: the figures only a run with batching has; its other figures are recorded as ``batched_<name>``
BATCHING_FIGURES = {"mean_batch_requests_saturation", "queue_wait_p50_ms", "queue_wait_p99_ms", "batched_gflops",
                    "batched_gflops_over_peak", "batched_call_over_single_calls",
                    "ideal_batched_call_over_single_calls"}
# the targets as restated with cross-request batching (issue #28): throughput against raw ORT on the
# cores the load generator leaves; GFLOP/s of the batched calls (single-request calls without batching)
TARGETS = [("e2e p50 <= 1.30 x raw ORT p50 (lone request)", "e2e_over_ort_p50", 1.30, "le"),
           ("p99 <= 2 x p50 at half saturation", "p99_over_p50_half_saturation", 2.0, "le"),
           ("zero soak errors", "soak_errors", 0, "le"),
           ("candidates/s at saturation >= 1.0 x raw ORT on the cores Locust leaves",
            "gateway_over_ort_throughput_locust_free", 1.0, "ge"),
           ("batched ORT GFLOP/s >= 0.5 x fp32 matmul peak", "batched_gflops_over_peak", 0.5, "ge"),
           ("ORT GFLOP/s >= 0.5 x fp32 matmul peak", "ort_gflops_over_peak", 0.5, "ge")]


def verdicts(values: dict[str, Any]) -> list[str]:
    """One line per target the run measured: met or missed, and by how much."""
    out = []
    for what, key, limit, op in TARGETS:
        if key not in values:  # batched GFLOP/s only with batching on
            continue
        v = values[key]
        if (v <= limit) if op == "le" else (v >= limit):
            out.append(f"Target {what}: met ({key} = {v:g}).")
        elif key == "soak_errors":
            out.append(f"Target {what}: MISSED ({key} = {v:g}; {v - limit:g} errors).")
        else:
            by = v / limit if op == "le" else limit / v if v else math.inf
            out.append(f"Target {what}: MISSED ({key} = {v:g}; {by:.2f}x off).")
    return out


def batch_window(before: Sample, after: Sample) -> dict[str, float]:
    """The gateway's batching figures over one window: mean requests per call, queue wait p50/p99."""
    requests, _ = stats.histogram_delta(before, after, "ctrserve_batch_requests")
    calls = sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == "ctrserve_batch_calls_total")
    if not requests:
        return {}
    return {"batch_requests": requests / max(calls, 1e-12),
            **{f"queue_wait_p{q}_ms": 1e3 * stats.histogram_quantile(before, after, "ctrserve_queue_wait_seconds",
                                                                      q / 100) for q in (50, 99)}}


def ladder(steps: tuple[int, ...]) -> list[int]:
    """The planned user counts, then doubling (up to MAX_USERS) until requests/s stop growing."""
    return list(steps) + [steps[-1] * 2**k for k in range(1, 8) if steps[-1] * 2**k <= MAX_USERS]


class LoadSteps:
    """The Locust steps of ``ServingRun`` (bench_all.py), whose state they share."""

    def _measure(self, name: str, users: int, seconds: float, **kw: Any) -> LoadResult:
        host = kw.pop("host", self.gw.url)
        return measure(self.launcher, host, name, self.pool_file, users, seconds, self.opts.candidates, **kw)

    def saturation_search(self) -> None:
        """Closed-loop Locust users stepped up until requests/s stop growing."""
        self._measure("warmup", self.plan.steps[0], self.plan.warmup_s, skip_s=0)
        self.steps: list[dict[str, float]] = []
        self.step_stages: list[dict[str, dict[str, float]]] = []
        for users in ladder(self.plan.steps):
            before = gateway_metrics(self.gw.port)
            r = self._measure(f"step-{users}", users, self.plan.step_s, server_pid=self.gw.proc.pid)
            after = gateway_metrics(self.gw.port)
            s = r.summary
            self.steps.append({"users": users, "rps": s.rps, "candidates_per_s": s.candidates_per_s,
                               "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "error_rate": s.error_rate,
                               "locust_cpu": r.locust_cpu_cores, "gateway_cpu": r.gateway_cpu_cores,
                               "machine_util": r.machine_util, **batch_window(before, after)})
            self.step_stages.append(stats.stage_breakdown(before, after))
            self.log(f"    {users:3d} users: {s.rps:7.1f} req/s, p50 {s.p50_ms:7.1f} ms, p99 {s.p99_ms:7.1f} ms, "
                     f"errors {s.errors}, locust CPU {r.locust_cpu_cores:.2f} cores")
            knee, self.saturated = saturation([(int(x["users"]), x["rps"]) for x in self.steps])
            if self.saturated:
                break
        self.knee = knee
        # the knee's users load the gateway for the soak, the profile and the baseline; the rate is
        # the best any step reached (at most 5 % above the knee's)
        self.sat = {**self.steps[knee], **{k: max(x[k] for x in self.steps) for k in ("rps", "candidates_per_s")}}
        sat, fig, thr = self.sat, self.fig, self.thr
        fig.add("saturation_rps", round(sat["rps"], 2), f"gateway requests/s at saturation (best step; knee at "
                f"{int(sat['users'])} users, {self.dist} candidates)")
        fig.add("saturation_candidates_per_s", round(sat["candidates_per_s"], 1), "candidates/s at saturation")
        fig.add("saturation_p50_ms", round(sat["p50_ms"], 3), "p50 at saturation")
        fig.add("saturation_p99_ms", round(sat["p99_ms"], 3), "p99 at saturation")
        fig.add("gateway_over_ort_throughput", round(sat["candidates_per_s"] / thr["candidates_per_s"], 3),
                "saturation candidates/s / raw ORT candidates/s (target >= 0.8)")
        if 1 in self.thr_by and self.thr_by[1] is not thr:
            fig.add("gateway_over_ort1_throughput", round(sat["candidates_per_s"] / self.thr_by[1]["candidates_per_s"],
                    3), "saturation candidates/s / raw ORT on one thread (the reference used before raw ORT counted "
                    "one thread per core)")
        free = max(self.cores - sat["locust_cpu"], 1e-9) / self.cores
        fig.add("gateway_over_ort_throughput_locust_free", round(sat["candidates_per_s"] / (thr["candidates_per_s"]
                * free), 3), f"the same against raw ORT on the cores the load generator leaves: raw rate x (1 - "
                f"Locust cores / {self.cores})")
        fig.add("locust_cpu_cores_saturation", round(sat["locust_cpu"], 3), "CPU of the Locust process at "
                "saturation (1.0 = one core)")
        fig.add("gateway_cpu_cores_saturation", round(sat["gateway_cpu"], 3), "CPU of the gateway at saturation")
        fig.add("machine_util_saturation", round(sat["machine_util"], 3), "whole-machine CPU use at saturation "
                "(0..1; includes other work on the machine)")
        self.saturation_time_figures()
        if self.batching:
            self.batching_figures()

    def saturation_time_figures(self) -> None:
        """Where a request's time goes at the knee step: the gateway's stage means over that step
        (inference includes the wait for an inference thread and, with batching, the queue), the
        rest of the time in the app, and what the client saw beyond it (network, accept queue)."""
        stages, knee, fig = self.step_stages[self.knee], self.steps[self.knee], self.fig
        mean = {k: v["mean_ms"] for k, v in stages.items()}
        for key in ("feature_fetch", "assembly", "inference"):
            if key in mean:
                fig.add(f"saturation_{key}_mean_ms", round(mean[key], 3), f"gateway stage mean at the knee step: {key}")
        in_app = mean.get("request_in_app", math.nan)
        staged = sum(mean.get(k, 0.0) for k in ("route", "feature_fetch", "assembly", "inference"))
        fig.add("saturation_in_app_other_mean_ms", round(in_app - staged, 3), "at the knee step: time in the app "
                "outside the stages (parsing, response, metrics, impression log)")
        fig.add("saturation_outside_app_p50_ms", round(knee["p50_ms"] - in_app, 3), "at the knee step: client p50 "
                "minus the in-app mean (loopback, the server's accept and read queue, Locust)")
        self.notes.append("Time per request at the knee step (gateway stage means, ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in mean.items()) + f"; client p50 {knee['p50_ms']:.2f}.")

    def batching_figures(self) -> None:
        """Cross-request batching at the knee: batch sizes and queue wait (the gateway's per-arm
        metrics over that step), and the multi-user graph's GFLOP/s at the batch size it formed."""
        knee, fig = self.steps[self.knee], self.fig
        fig.add("mean_batch_requests_saturation", round(knee["batch_requests"], 3), "requests per inference call at "
                "the knee step (ctrserve_batch_requests_total / ctrserve_batch_calls_total over the step)")
        fig.add("queue_wait_p50_ms", round(knee["queue_wait_p50_ms"], 4), "a request's wait in the batching queue "
                "at the knee step, p50 (ctrserve_queue_wait_seconds, bucket-interpolated)")
        fig.add("queue_wait_p99_ms", round(knee["queue_wait_p99_ms"], 4), "the same, p99")
        r = min(self.batched, key=lambda n: abs(n - knee["batch_requests"]))
        eff = self.batched[r]
        fig.add("batched_gflops", round(eff["gflops"], 2), f"multi-user graph GFLOP/s at R = {r} users x 100 "
                f"candidates (the measured R nearest the knee's mean batch), 1 thread ({eff['model_p50_ms']:.3f} ms)")
        fig.add("batched_gflops_over_peak", round(eff["ratio"], 4), "batched_gflops / sgemm_peak_gflops of the "
                "same run (target >= 0.5; single request: ort_gflops_over_peak); by R: " + ", ".join(
                    f"{n}: {e['ratio']:.3f}" for n, e in self.batched.items()))
        single_ms = self.single_eff["model_p50_ms"]
        fig.add("batched_call_over_single_calls", round(eff["model_p50_ms"] / (r * single_ms), 3), f"one multi-user "
                f"call of R = {r} requests / R single-request calls ({single_ms:.3f} ms each), tight loop, 1 thread: "
                "below 1 the merged call is cheaper; by R: " + ", ".join(
                    f"{n}: {e['model_p50_ms'] / (n * single_ms):.2f}" for n, e in self.batched.items()))
        fig.add("ideal_batched_call_over_single_calls", round(self.ideal[r], 3), f"the ceiling of any multi-user "
                f"graph: one user with {r} x 100 candidates on the single-user graph / {r} calls of 100 (interleaved, "
                "1 thread); by R: " + ", ".join(f"{n}: {v:.2f}" for n, v in self.ideal.items()))

    def soak(self) -> None:
        """Paced users at half the saturation rate: p99/p50, errors, and the ideal servers' bound."""
        half_rps, users = self.sat["rps"] / 2, max(2, int(self.sat["users"]))
        self.log(f"    saturation {self.sat['rps']:.1f} req/s, knee at {self.sat['users']:.0f} users (seen: "
                 f"{self.saturated}); soak {self.plan.soak_s:g} s at {half_rps:.1f} req/s")
        soak = self._measure("soak", users, self.plan.soak_s, target_rps=half_rps, server_pid=self.gw.proc.pid)
        s, fig = soak.summary, self.fig
        fig.add("half_saturation_rps", round(s.rps, 2), f"achieved rate of the soak, paced to {half_rps:.1f} req/s "
                f"with {users} users")
        fig.add("half_saturation_p50_ms", round(s.p50_ms, 3), "p50 at half saturation")
        fig.add("half_saturation_p99_ms", round(s.p99_ms, 3), "p99 at half saturation")
        fig.add("p99_over_p50_half_saturation", round(s.p99_ms / s.p50_ms, 3), "p99 / p50 at half the saturation "
                "rate (target <= 2)")
        # the same send times served by ideal one-at-a-time servers whose service time is the sequential e2e latency
        self.soak_samples = load_samples(soak.samples)
        t = self.soak_samples["t"]
        sent = (t - self.soak_samples["ms"] / 1e3)[t >= t.min() + soak.skip_s]  # the requests the summary kept
        ideal = {c: percentiles(fifo_responses(sent, np.asarray(self.e2e_ms), servers=c), (50, 99)) for c in (1, 2)}
        for c, name in ((1, "single_server"), (2, "two_server")):
            lo, hi = ideal[c]
            fig.add(f"p99_over_p50_{name}_bound", round(hi / lo, 3), (
                "p99 / p50 that an ideal first-come-first-served server would give on the soak's own send times, "
                "each request served in a sequential e2e latency drawn from this run (stats.fifo_responses): the "
                "queueing part of the tail, which faster code in a one-at-a-time server (inline execution, one "
                "worker) cannot remove") if c == 1 else "the same with two ideal servers (two requests served at once)")
            fig.add(f"{name}_bound_p50_ms", round(lo, 3), f"the {c}-server bound's p50")
            fig.add(f"{name}_bound_p99_ms", round(hi, 3), f"the {c}-server bound's p99 (compare "
                    "half_saturation_p99_ms)")
        fig.add("soak_seconds", round(s.duration_s, 1), "measured soak duration")
        fig.add("soak_requests", s.requests, "requests in the soak")
        fig.add("soak_errors", s.errors, "failed requests in the soak (status, score count, range checks; target 0)")
        self.notes.append(f"Tail at half saturation: measured p50/p99 {s.p50_ms:.2f}/{s.p99_ms:.2f} ms (ratio "
                          f"{fig['p99_over_p50_half_saturation']:g}); ideal servers on the same send times, serving "
                          "each request in a sequential e2e latency of this run (queueing alone): one server "
                          f"{ideal[1][0]:.2f}/{ideal[1][1]:.2f} ms (ratio {ideal[1][1] / ideal[1][0]:.2f}), two "
                          f"servers {ideal[2][0]:.2f}/{ideal[2][1]:.2f} ms (ratio {ideal[2][1] / ideal[2][0]:.2f}).")

    def load_gateway(self) -> None:
        """Saturation, then the soak at half of it; then the gateway stops."""
        self.saturation_search()
        self.soak()
        self.launcher.stop(self.gw.child)

    def baseline(self) -> None:
        """The eager FastAPI baseline under the knee's load, same traffic."""
        users = int(self.sat["users"])
        server, host = start_baseline(self.launcher, self.run_dir)
        self._measure("baseline-warmup", users, self.plan.warmup_s, host=host, mode="baseline", skip_s=0)
        bs = self._measure("baseline", users, self.plan.baseline_s, host=host, mode="baseline",
                           server_pid=server.pid).summary
        self.fig.add("eager_fastapi_rps", round(bs.rps, 2), f"eager FastAPI baseline, {users} users, same traffic")
        self.fig.add("eager_fastapi_p50_ms", round(bs.p50_ms, 3), "its p50")
        self.fig.add("eager_fastapi_errors", bs.errors, "its failed requests")
        self.fig.add("eager_fastapi_over_gateway_throughput", round(bs.candidates_per_s / self.sat["candidates_per_s"],
                     3), "baseline candidates/s / gateway candidates/s at the same users")

    def finish(self, facts: dict[str, Any], t_start: float) -> None:
        """The figure from the models section, plots, verdicts and notes; the facts at the end."""
        from ctrserve.paths import REPO_ROOT

        plan, opts, fig = self.plan, self.opts, self.fig
        if self.models_out is not None:
            fig.add("models_ort_p50_ms_b100_same_run", self.models_out["figures"]["ort_p50_ms_b100"], "ORT p50 at "
                    "B = 100 from the `models` section of this run (test harness of bench models)")
        title = f"{opts.model}, {self.dist} candidates, load avg {facts.get('load_avg_1m')} at start"
        stem = "bench_batched" if self.batching else "bench"
        plots = [plot_run(self.soak_samples, self.img_dir / f"{stem}_soak.png", f"soak at half saturation: {title}"),
                 plot_saturation(self.steps, self.img_dir / f"{stem}_saturation.png", f"saturation: {title}")]
        self.notes[:0] = verdicts(fig.values())
        self.notes.append("ORT kernel time by operator at B = 100 (ms per request): " + ", ".join(
            f"{op} {ms:.2f} ({share:.0%})" for op, ms, share in self.by_op[:8]) + ".")
        self.notes.append("Saturation steps (users: req/s, p50/p99 ms): " + ", ".join(
            f"{s['users']:.0f}: {s['rps']:.1f}, {s['p50_ms']:.0f}/{s['p99_ms']:.0f}" for s in self.steps) +
            ("" if self.saturated else " — requests/s still grew at the last step: saturation not reached, the "
             "figures use the best step"))
        shown = ", ".join(f"`{p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p}`" for p in plots)
        self.notes.append(
            f"Method: one `ctrserve bench all` process; the fixed request is the most active pool user with B "
            f"candidates, its inputs assembled by the gateway's own code from the store; gateway with "
            f"{opts.gateway.workers} worker(s); Locust closed-loop users stepped {list(plan.steps)} for "
            f"{plan.step_s:g} s each (saturation = the step after which requests/s grew < 5 %); the soak runs at "
            f"half that rate (paced users: each sends one request at a random moment of every period, "
            f"traffic.Pacer) and gives both p99/p50 and soak_errors; the first 2 s of each Locust run are dropped. "
            f"Plots: {shown}. Raw files: `{self.work}`.")
        self.notes.append(f"store_fetch_p50_ms ({self.store_out['figures']['store_fetch_p50_ms']:.3f} ms) and "
                          "triton_hop_ms_batch1 come from the `store` and `models` sections, written by this same run.")
        facts["load_avg_1m_end"] = load_average()
        facts["seconds"] = round(time.time() - t_start)
