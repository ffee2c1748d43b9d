"""``ctrserve bench graph``: how well the benchmark model's ONNX graph uses one core, in isolation,
cheap enough to run after every graph change (``bench all`` reports the same ratio among others).

The benchmark run exported with the current code (or ``--onnx FILE``): op counts of the graph and
of ONNX Runtime's optimised graph, FLOPs of one request, ORT's p50 (as the gateway's backend runs
it) over the fp32 matmul peak, ORT's per-operator profile; ``--compare FILE`` times other exports
of the same model interleaved with it. Nothing is recorded: the figures of record are bench all's.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .harness import console_log, failing_as_exit, interleave, ort_options, ort_session, print_table
from .workload import bench_dir, build_requests, ensure_run, prepared_of


def graph_ops(path: Path) -> Counter[str]:
    """Op types of the ONNX file's main graph, with counts."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def optimized_ops(path: Path) -> Counter[str]:
    """Op types of ONNX Runtime's optimised graph (full optimisation, CPU), i.e. the kernels that run."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort_options()
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return graph_ops(Path(opts.optimized_model_filepath))


def interleaved_latency(paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int,
                        per_round: int) -> dict[str, dict[str, Any]]:
    """Per-call latency (ms) of each graph on ``feed``: ``rounds`` rounds, every variant ``per_round``
    calls per round, variants alternating (order reversed every other round). Also checks that all
    variants give the same scores (they must be the same model)."""
    sessions = {k: ort_session(p) for k, p in paths.items()}
    feeds = {k: {i.name: feed[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    ref = None
    for label, sess in sessions.items():
        for _ in range(20):  # warm-up
            out = sess.run(None, feeds[label])[0]
        if ref is None:
            ref = out
        elif out.shape != ref.shape or float(np.max(np.abs(out - ref))) > 1e-4:
            raise RuntimeError(f"{label} gives other scores than {next(iter(paths))}: not the same model")
    samples = interleave({k: lambda _i, s=s, f=feeds[k]: s.run(None, f) for k, s in sessions.items()}, rounds,
                         per_round, alternate=True)
    return {k: {"p50_ms": float(np.median(v)), "n": len(v),
                "round_p50_ms": [float(np.median(v[r:r + per_round])) for r in range(0, len(v), per_round)]}
            for k, v in samples.items()}


def run(onnx_file: Path | None = None, compare: list[Path] | None = None, candidates: int = 100,
        rounds: int = 6, per_round: int = 200, profile_runs: int = 50, run_dir: Path | None = None,
        log: Any = print) -> dict[str, Any]:
    from ctrserve.contract.manifest import Manifest
    from ctrserve.export import runtimes
    from ctrserve.export.exporter import export_run

    from . import flops

    runtimes.set_threads(1)  # the export and its parity check in this process
    run_dir = Path(run_dir) if run_dir else ensure_run("mgdin")
    if onnx_file is None:
        log(f"[bench graph] exporting {run_dir.name} with the current code (parity-gated)")
        repo = bench_dir() / "graph_repository"
        res = export_run(run_dir, "onnx", repo, name="mgdin", version=1, force=True)
        onnx_file, manifest = res.version_dir / res.manifest.file, res.manifest
    else:
        onnx_file = Path(onnx_file)
        manifest = Manifest.load(onnx_file.parent)
    feed = build_requests(manifest, prepared_of(run_dir), [candidates])[candidates]
    paths = {"current": onnx_file, **{f"compare:{p}": Path(p) for p in compare or []}}

    log("[bench graph] op counts, FLOPs")
    graphs = {}
    for label, path in paths.items():
        ops, opt = graph_ops(path), optimized_ops(path)
        count = flops.count_flops(path, feed)
        graphs[label] = {"file": str(path), "nodes": sum(ops.values()), "ops": dict(ops.most_common()),
                         "ort_nodes": sum(opt.values()), "ort_ops": dict(opt.most_common()),
                         "flops": count.total, "flops_by_op": count.by_op, "flop_nodes": count.nodes,
                         "skipped": count.skipped}
    log("[bench graph] fp32 matmul peak (1 thread)")
    peak = flops.sgemm_peak(threads=1)
    log(f"[bench graph] ORT latency at B={candidates}: {rounds} interleaved rounds x {per_round} calls")
    lat = interleaved_latency(paths, feed, rounds, per_round)
    for label, g in graphs.items():
        g.update(lat[label])
        g["gflops"] = g["flops"] / (g["p50_ms"] / 1e3) / 1e9
        g["gflops_over_peak"] = g["gflops"] / peak
    log(f"[bench graph] ORT profile of {onnx_file} ({profile_runs} runs)")
    events = flops.ort_profile_events(onnx_file, feed, runs=profile_runs)
    profile = flops.aggregate_profile(events, profile_runs)
    return {"run_dir": str(run_dir), "candidates": candidates, "peak_gflops": peak, "graphs": graphs,
            "profile": profile}


def graph_cmd(
    onnx: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="ONNX file to measure (its directory "
                                              "must hold the manifest; default: export the benchmark run with the "
                                              "current code)")] = None,
    compare: Annotated[list[Path] | None, typer.Option(exists=True, dir_okay=False, help="other ONNX file(s) of the "
                                                       "same model, timed interleaved with the first (repeat)")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="candidates per request")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds")] = 6,
    per_round: Annotated[int, typer.Option(min=1, help="calls per graph per round")] = 200,
    profile_runs: Annotated[int, typer.Option(min=1, help="runs under ORT's profiler")] = 50,
    run_dir: Annotated[Path | None, typer.Option("--run", help="run directory (default: the benchmark run)")] = None,
) -> None:
    """Op counts, FLOPs, ORT p50 and GFLOP/s over the fp32 matmul peak of the benchmark model's graph."""
    from rich.console import Console

    console = Console()
    with failing_as_exit(console):
        out = run(onnx, compare, candidates, rounds, per_round, profile_runs, run_dir, log=console_log(console))
    print_table(console, f"B={out['candidates']}, 1 ORT thread; fp32 matmul peak {out['peak_gflops']:.1f} GFLOP/s",
                ("graph", "nodes", "ORT nodes", "MFLOP", "p50 ms", "round p50s", "GFLOP/s", "/ peak"),
                ((label, str(g["nodes"]), str(g["ort_nodes"]), f"{g['flops'] / 1e6:.1f}", f"{g['p50_ms']:.3f}",
                  " ".join(f"{x:.2f}" for x in g["round_p50_ms"]), f"{g['gflops']:.1f}", f"{g['gflops_over_peak']:.3f}")
                 for label, g in out["graphs"].items()))
    for label, g in out["graphs"].items():
        console.print(f"{label}: graph ops {g['ops']}")
        console.print(f"{label}: ORT ops {g['ort_ops']}")
    print_table(console, "ORT per-op kernel time of the first graph (profiler on)", ("op", "ms / run", "share"),
                ((op, f"{ms:.4f}", f"{share:.1%}") for op, ms, share in out["profile"]))
