"""One Locust run against a server and its summary; the plots of load runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stats import Summary, load_samples, summarize


@dataclass
class LoadResult:
    summary: Summary
    locust_cpu_cores: float
    gateway_cpu_cores: float
    machine_util: float
    csv_prefix: Path
    samples: Path
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
                      run.csv_prefix, run.samples, skip)


# -- plots -----------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    _pyplot().close(fig)
    return out


def plot_run(samples: dict[str, np.ndarray], out: Path, title: str) -> Path:
    """Latency over time (p50/p95/p99 per second, requests/s) and a latency histogram, one PNG."""
    t, ms, ok = samples["t"], samples["ms"], samples["ok"].astype(bool)
    sec = np.floor(t - t.min()).astype(int)
    fig, (ax1, ax2) = _pyplot().subplots(1, 2, figsize=(12, 4.2))
    xs = np.unique(sec)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ax1.plot(xs, [np.percentile(ms[sec == s], q) for s in xs], style, label=f"p{q}")
    ax1.set(xlabel="time (s)", ylabel="latency (ms)", title="latency over time")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left")
    rate = ax1.twinx()
    rate.plot(xs, [int((sec == s).sum()) for s in xs], color="grey", alpha=0.5, label="requests/s")
    if (~ok).any():
        rate.plot(xs, [int(((sec == s) & ~ok).sum()) for s in xs], color="red", label="errors/s")
    rate.set_ylabel("requests/s")
    rate.set_ylim(bottom=0)
    rate.legend(loc="upper right")
    ax2.hist(np.clip(ms, 0, float(np.percentile(ms, 99.9)) * 1.1), bins=80, color="tab:blue")
    for q in (50, 99):
        v = float(np.percentile(ms, q))
        ax2.axvline(v, color="k", ls="--" if q == 50 else ":", lw=1)
        ax2.text(v, ax2.get_ylim()[1] * 0.9, f" p{q} {v:.1f}", fontsize=8)
    ax2.set(xlabel="latency (ms)", ylabel="requests", title="latency histogram")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def plot_saturation(steps: list[dict[str, float]], out: Path, title: str) -> Path:
    """Requests/s and p50/p99 over the Locust users of the saturation search."""
    users = [s["users"] for s in steps]
    fig, ax = _pyplot().subplots(figsize=(6.5, 4))
    ax.plot(users, [s["rps"] for s in steps], "o-", label="requests/s")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="Locust users (closed loop)", ylabel="requests/s")
    lat = ax.twinx()
    lat.plot(users, [s["p50_ms"] for s in steps], "s--", color="tab:orange", label="p50 ms")
    lat.plot(users, [s["p99_ms"] for s in steps], "^:", color="tab:red", label="p99 ms")
    lat.set_ylabel("latency (ms)")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, out)
