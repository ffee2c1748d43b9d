"""Summary math of the load tests (pure functions over numpy arrays and text): percentiles,
rates, saturation, the queueing bound of ideal servers, Prometheus histogram deltas."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Summary:
    """One load run. Latencies in ms over every request (failed ones included: a fast error is
    not a good answer, but it still took that long); rates over the measured window."""

    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    rps: float
    candidates_per_s: float
    mean_candidates: float
    duration_s: float


def percentiles(ms: np.ndarray, qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    """Linear-interpolated percentiles (numpy's default); NaN for no samples."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return [math.nan] * len(qs)
    return [float(x) for x in np.percentile(a, qs)]


def summarize(t: np.ndarray, ms: np.ndarray, candidates: np.ndarray, ok: np.ndarray,
              skip_s: float = 0.0) -> Summary:
    """Summarise per-request samples (``t`` = completion wall time in s). The first ``skip_s``
    seconds (ramp-up) are dropped; the rate window runs from the first kept completion to the
    last one."""
    t = np.asarray(t, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no requests were made: nothing to summarise")
    keep = t >= t.min() + skip_s
    t, ms = t[keep], np.asarray(ms, dtype=np.float64)[keep]
    cands, ok = np.asarray(candidates)[keep], np.asarray(ok, dtype=bool)[keep]
    n = int(t.size)
    if n == 0:
        raise ValueError(f"no requests after skipping the first {skip_s:g} s")
    # n completions span n-1 inter-arrival gaps; with one sample the rate is undefined
    duration = float(t.max() - t.min())
    rps = (n - 1) / duration if duration > 0 else math.nan
    p50, p95, p99 = percentiles(ms)
    errors = int((~ok).sum())
    return Summary(requests=n, errors=errors, error_rate=errors / n, p50_ms=p50, p95_ms=p95, p99_ms=p99,
                   max_ms=float(ms.max()), mean_ms=float(ms.mean()), rps=rps,
                   candidates_per_s=rps * float(cands[ok].sum()) / n,  # answered candidates only
                   mean_candidates=float(cands.mean()), duration_s=duration)


def fifo_responses(arrivals_s: np.ndarray, service_ms: np.ndarray, servers: int = 1, seed: int = 0) -> np.ndarray:
    """Response times (ms, in arrival order) of ideal first-come-first-served servers: requests
    arriving at ``arrivals_s`` (seconds, any order) each go to the server that frees first and are
    served for a time drawn with replacement from ``service_ms``, with no overhead of the servers'
    own (one server: Lindley's recursion). Fed with a load run's send times and the sequential
    latencies of the same request, it gives the tail that queueing alone produces at that arrival
    process: the part of p99/p50 that faster code in a server doing ``servers`` requests at a time
    cannot remove."""
    a = np.sort(np.asarray(arrivals_s, dtype=np.float64)) * 1e3
    pool = np.asarray(service_ms, dtype=np.float64)
    if a.size == 0 or pool.size == 0:
        raise ValueError("need at least one arrival and one service time")
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    service = np.random.default_rng(seed).choice(pool, size=a.size)
    free = [-math.inf] * servers  # a heap of the times each server frees
    out = np.empty_like(a)
    for i in range(a.size):
        start = max(a[i], heapq.heappop(free))
        heapq.heappush(free, start + service[i])
        out[i] = start + service[i] - a[i]
    return out


def load_samples(path: Path) -> dict[str, np.ndarray]:
    """The locustfile's ``--samples-out`` file."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def saturation(steps: Sequence[tuple[int, float]], tolerance: float = 0.05, patience: int = 2) -> tuple[int, bool]:
    """Index of the saturation step in ``steps`` = [(users, requests/s), ...] (ascending users):
    the first step within ``tolerance`` of the highest rate (the knee: more users past it only
    queue), and whether saturation was seen, i.e. the ``patience`` steps
    after the best one each failed to raise the rate by more than ``tolerance`` (relative) over it.
    One flat step is not enough: with ``auto`` execution two closed-loop users mostly take turns
    on the event loop and the rate jumps again at four (seen: 266, 274, then more at 4 users; one
    flat step had ended the search at 274). Unsaturated: step further."""
    if not steps:
        raise ValueError("no steps")
    best = 0
    for i in range(1, len(steps)):
        if steps[i][1] > steps[best][1] * (1 + tolerance):
            best = i
    top = max(rate for _, rate in steps)
    knee = next(i for i, (_, rate) in enumerate(steps) if rate * (1 + tolerance) >= top)
    return knee, len(steps) - 1 - best >= patience


# -- Prometheus ------------------------------------------------------------------------------
Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_prometheus(text: str) -> Sample:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Sample = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def histogram_delta(before: Sample, after: Sample, name: str, **labels: str) -> tuple[float, float]:
    """``after - before`` of histogram ``name``'s (count, sum) over the series matching ``labels``."""

    def total(suffix: str) -> float:
        return sum(v - before.get((n, lbl), 0.0) for (n, lbl), v in after.items()
                   if n == name + suffix and all(dict(lbl).get(k) == x for k, x in labels.items()))

    return total("_count"), total("_sum")


def histogram_quantile(before: Sample, after: Sample, name: str, q: float) -> float:
    """The ``q`` quantile of histogram ``name`` over a window (``after - before``, all series
    summed), linear within the bucket that holds it, as Prometheus' ``histogram_quantile``."""
    counts: dict[float, float] = {}
    for (n, lbl), v in after.items():
        if n == name + "_bucket":
            le = float(dict(lbl)["le"])
            counts[le] = counts.get(le, 0.0) + v - before.get((n, lbl), 0.0)
    bounds = sorted(counts)
    if not bounds or counts[bounds[-1]] <= 0:
        return math.nan
    rank, lower, below = q * counts[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if counts[le] >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bucket: its bound is all we know
            return lower + (le - lower) * (rank - below) / max(counts[le] - below, 1e-12)
        lower, below = le, counts[le]
    return math.nan


def stage_breakdown(before: Sample, after: Sample, route: str = "/v1/score") -> dict[str, dict[str, float]]:
    """Per-stage mean (ms) and count of the gateway's ``ctrserve_stage_seconds`` over a window, and
    of the whole request inside the app (``ctrserve_request_seconds``, status 200)."""
    windows = {stage: histogram_delta(before, after, "ctrserve_stage_seconds", stage=stage)
               for stage in ("route", "feature_fetch", "assembly", "inference")}
    windows["request_in_app"] = histogram_delta(before, after, "ctrserve_request_seconds", route=route, status="200")
    return {key: {"mean_ms": total / count * 1e3, "count": count} for key, (count, total) in windows.items() if count}
