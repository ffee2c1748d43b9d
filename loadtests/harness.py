"""What every benchmark shares: a table of figures, steps that log and time themselves, the
machine facts, percentiles, the interleaved timing loop, raw ONNX Runtime set up as the gateway's
backend runs it, and how the commands report errors and print tables. The benchmark modules
import from here, never from each other's private helpers."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .stats import percentiles

Log = Callable[..., Any]


class Figures:
    """A benchmark's figures: name -> (value, meaning), in the order they were added."""

    def __init__(self) -> None:
        self.table: dict[str, tuple[Any, str]] = {}

    def add(self, name: str, value: Any, meaning: str) -> None:
        if name in self.table:
            raise KeyError(f"figure {name} added twice")
        self.table[name] = (value, meaning)

    def __getitem__(self, name: str) -> Any:
        return self.table[name][0]

    def values(self) -> dict[str, Any]:
        return {k: v for k, (v, _) in self.table.items()}

    def renamed(self, rename: Callable[[str], str]) -> Figures:
        """The same figures under other names (one run recorded beside another of its kind)."""
        out = Figures()
        for name, (value, meaning) in self.table.items():
            out.add(rename(name), value, meaning)
        return out

    def record(self, section: str, title: str, command: str, notes: list[str], machine: dict[str, Any]) -> None:
        """Merge into docs/benchmarks.json and rewrite the section of docs/benchmarks.md."""
        from .report import record_section, write_markdown

        write_markdown(section, record_section(section, title, command, self.table, notes, machine))


def run_steps(name: str, steps: Sequence[tuple[str, Callable[[], object]]], log: Log = print) -> dict[str, float]:
    """Run ``steps`` (title, function) in order, logging ``[name] i/n title``; seconds per step."""
    seconds = {}
    for i, (title, step) in enumerate(steps, 1):
        log(f"[{name}] {i}/{len(steps)} {title}")
        t0 = time.monotonic()
        step()
        seconds[title] = round(time.monotonic() - t0, 1)
    return seconds


def console_log(console: Any) -> Log:
    """``console.print`` without rich markup: the step lines start with ``[bench ...]``."""
    return lambda *parts: console.print(*parts, markup=False)


def machine_facts(**extra: str) -> dict[str, Any]:
    """Where the figures were measured: cores, CPU, Python and library versions, load average."""
    cpu = platform.processor() or "unknown"
    with suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    facts: dict[str, Any] = {"cores": os.cpu_count(), "cpu": cpu, "os": platform.platform(terse=True),
                             "python": sys.version.split()[0]}
    for dist in ("numpy", "redis", "hiredis"):
        with suppress(metadata.PackageNotFoundError):
            facts[dist] = metadata.version(dist)
    with suppress(OSError):  # other work on the machine shows up in the tail latencies
        facts["load_avg_1m"] = load_average()
    facts.update(extra)
    return facts


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


# -- statistics ------------------------------------------------------------------------------
def p50(ms: Sequence[float]) -> float:
    return percentiles(np.asarray(ms), (50,))[0]


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies in ms."""
    a = np.asarray(ms, dtype=np.float64)
    lo, hi = percentiles(a, (50, 99))
    return {"p50": lo, "p99": hi, "mean": float(a.mean()) if a.size else float("nan")}


# -- timing ----------------------------------------------------------------------------------
def _schedule(names: list[str], rounds: int, per_round: int | Mapping[str, int], alternate: bool, warmup: int,
              ) -> Iterator[tuple[bool, str, range]]:
    """(kept, variant, call indices) in the order the variants take turns: round by round, every
    variant ``per_round`` calls per round (order reversed every other round with ``alternate``),
    all variants of a round on the same call indices; the first ``warmup`` rounds are discarded."""
    for r in range(warmup + rounds):
        for name in names[::-1] if alternate and r % 2 else names:
            n = per_round if isinstance(per_round, int) else per_round[name]
            yield r >= warmup, name, range(r * n, (r + 1) * n)


async def interleave_async(variants: Mapping[str, Callable[[int], object]], rounds: int,
                           per_round: int | Mapping[str, int], alternate: bool = False, warmup: int = 0,
                           ) -> dict[str, list[float]]:
    """Per-call latency (ms) of each variant, timed interleaved in rounds so that machine noise
    hits them alike. A variant is called with the running call index (to pick its request); a
    coroutine it returns is awaited inside the timing."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for kept, name, calls in _schedule(list(variants), rounds, per_round, alternate, warmup):
        fn, out = variants[name], samples[name]
        gc.collect()
        for i in calls:
            t0 = time.perf_counter()
            result = fn(i)
            if inspect.isawaitable(result):
                await result
            if kept:
                out.append((time.perf_counter() - t0) * 1e3)
    return samples


def interleave(variants: Mapping[str, Callable[[int], object]], rounds: int, per_round: int | Mapping[str, int],
               alternate: bool = False, warmup: int = 0) -> dict[str, list[float]]:
    """``interleave_async`` for plain functions, from code outside an event loop."""
    return asyncio.run(interleave_async(variants, rounds, per_round, alternate, warmup))


def ort_options(threads: int = 1, optimize: bool = True, spinning: bool = True) -> Any:
    """ONNX Runtime session options as the gateway's backend sets them: ``threads`` intra-op
    threads, one inter-op thread, sequential execution, full graph optimisation (``optimize``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def ort_session(path: Path | bytes, threads: int = 1, **options: bool) -> Any:
    """An ONNX Runtime session on the CPU with ``ort_options``."""
    import onnxruntime as ort

    model = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(model, sess_options=ort_options(threads, **options), providers=["CPUExecutionProvider"])


# -- the command line ------------------------------------------------------------------------
@contextmanager
def failing_as_exit(console: Any) -> Iterator[None]:
    """A benchmark that cannot run (bad option, missing run or binary, a server that fails) ends
    with one red line and exit code 1 instead of a traceback."""
    try:
        yield
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


def print_table(console: Any, title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
