"""One Locust run against a server and its summary; the plots of load runs."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctrserve.launch import Launcher

from .stats import Summary, load_samples, summarize

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@dataclass
class LoadResult:
    summary: Summary
    locust_cpu_cores: float  # CPU seconds of the Locust process / wall seconds (1.0 = one core busy)
    gateway_cpu_cores: float  # the same for the measured server and its children (NaN when not watched)
    machine_util: float  # the whole machine's CPU utilisation during the run (0..1 of all cores)
    csv_prefix: Path
    samples: Path
    skip_s: float  # the ramp-up the summary dropped (seconds from the first completion)


def _cpu_seconds(proc: Any) -> float:
    """User + system CPU seconds of a ``psutil.Process`` and its children (0 for what has gone)."""
    total = 0.0
    try:
        family = [proc, *proc.children(recursive=True)]
    except Exception:  # psutil.NoSuchProcess etc.: it has gone
        return total
    for p in family:
        with contextlib.suppress(Exception):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def measure(launcher: Launcher, host: str, name: str, pool_file: Path, users: int, duration_s: float,
            candidates: str, mode: str = "gateway", target_rps: float = 0.0, server_pid: int | None = None,
            skip_s: float = 2.0) -> LoadResult:
    """Locust headless against ``host`` for ``duration_s`` (bounded: duration + 60 s), its files in
    ``launcher.workdir / name``; the summary drops the first ``skip_s`` seconds (spawning)."""
    import psutil

    out = launcher.workdir / name
    out.mkdir(parents=True, exist_ok=True)
    prefix, samples, log = out / "locust", out / "samples.npz", out / "locust.log"
    samples.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{max(1, round(duration_s))}s", "--host", host, "--csv", str(prefix), "--csv-full-history",
           "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "10", "--pool", str(pool_file),
           "--candidates", candidates, "--mode", mode, "--target-rps", str(target_rps), "--samples-out", str(samples)]
    server = psutil.Process(server_pid) if server_pid is not None else None
    server_before = _cpu_seconds(server) if server else 0.0
    psutil.cpu_percent(None)
    t0 = time.monotonic()
    locust = launcher.spawn(f"locust-{name}", cmd, log=log)
    me, cpu = psutil.Process(locust.pid), 0.0
    try:
        while locust.running:
            cpu = max(cpu, _cpu_seconds(me))  # the last reading before it exits
            if time.monotonic() - t0 > duration_s + 60:
                raise RuntimeError(f"locust ({name}) did not stop within {duration_s + 60:.0f} s")
            time.sleep(0.2)
    finally:
        launcher.stop(locust, grace=15)
    wall = time.monotonic() - t0
    util = psutil.cpu_percent(None) / 100
    server_cores = (_cpu_seconds(server) - server_before) / wall if server else float("nan")
    if not samples.exists():
        raise RuntimeError(f"locust ({name}) wrote no samples (exit code {locust.proc.returncode}); log tail:\n"
                           f"{locust.log_tail(60)}")
    s = load_samples(samples)
    skip = min(skip_s, duration_s / 4)
    summary = summarize(s["t"], s["ms"], s["candidates"], s["ok"], skip_s=skip)
    return LoadResult(summary, cpu / wall, server_cores, util, prefix, samples, skip)


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
