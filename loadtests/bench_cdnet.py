"""``ctrserve bench cdnet``: CDNet's cost against its accuracy (docs/models/cdnet.md, "Cost").

For each trained run given (CDNet, its full-sequence variant, the best baseline: ``--run NAME=DIR``):
its recorded test AUC and standard error (metrics.json), and for one request of one user and 100
candidates at the run's history length, the FLOPs of the exported ONNX graph (loadtests/flops.py)
and ONNX Runtime's p50 on one thread, all graphs timed interleaved in one process.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .harness import failing_as_exit, interleave, machine_facts, ort_session, print_table
from .workload import build_requests, prepared_of

SECTION = "cdnet"


def measure(runs: dict[str, Path], candidates: int = 100, rounds: int = 6, per_round: int = 100) -> dict[str, Any]:
    """``name -> {auc, auc_se, seq_len, flops, p50_ms}`` for each run (exported to ONNX, parity-gated)."""
    from ctrserve.export import runtimes
    from ctrserve.export.exporter import export_run

    from . import flops

    runtimes.set_threads(1)
    out: dict[str, dict[str, Any]] = {}
    sessions, feeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            res = export_run(run, "onnx", Path(tmp), name=name.replace("-", "_"), version=1, force=True)
            onnx_file = res.version_dir / res.manifest.file
            feed = build_requests(res.manifest, prepared_of(run), [candidates])[candidates]
            metrics = json.loads((Path(run) / "metrics.json").read_text())
            seq = res.manifest.feature_map.sequence_fields
            out[name] = {"auc": metrics["auc"], "auc_se": metrics.get("auc_se", float("nan")),
                         "seq_len": int(feed[seq[0].name].shape[1]) if seq else 0,
                         "flops": flops.count_flops(onnx_file, feed).total}
            sessions[name], feeds[name] = ort_session(onnx_file), feed
        for name, sess in sessions.items():  # warm-up, and the inputs the graph takes
            feeds[name] = {i.name: feeds[name][i.name] for i in sess.get_inputs()}
            for _ in range(20):
                sess.run(None, feeds[name])
        samples = interleave({k: lambda _i, s=s, f=feeds[k]: s.run(None, f) for k, s in sessions.items()},
                             rounds, per_round, alternate=True)
    for name, ms in samples.items():
        out[name]["p50_ms"] = float(np.median(ms))
    return out


def cdnet_cmd(
    run: Annotated[list[str], typer.Option(help="NAME=RUN_DIR, repeat (cdnet=.., cdnet_full_seq=.., dcnv2=..)")],
    candidates: Annotated[int, typer.Option(min=1, help="candidates per request")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds")] = 6,
    per_round: Annotated[int, typer.Option(min=1, help="calls per graph per round")] = 100,
) -> None:
    """Test AUC beside ms and FLOPs per request of each run (CDNet's cost-vs-accuracy table)."""
    from rich.console import Console

    from .report import record_section, write_markdown

    console = Console()
    with failing_as_exit(console):
        pairs = [r.split("=", 1) for r in run]
        if any(len(p) != 2 or not Path(p[1]).is_dir() for p in pairs):
            raise ValueError(f"--run takes NAME=RUN_DIR with an existing run directory, got {run}")
        out = measure({k: Path(v) for k, v in pairs}, candidates, rounds, per_round)
    print_table(console, f"{candidates} candidates, 1 ORT thread", ("run", "L", "test AUC", "MFLOP", "p50 ms"),
                ((k, str(v["seq_len"]), f"{v['auc']:.4f} ± {v['auc_se']:.4f}", f"{v['flops'] / 1e6:.1f}",
                  f"{v['p50_ms']:.3f}") for k, v in out.items()))
    figures: dict[str, tuple[float, str]] = {}
    for k, v in out.items():
        key = k if k.startswith("cdnet") else f"cdnet_vs_{k}"
        figures.update({f"{key}_auc": (v["auc"], f"{k}: test AUC of the run (docs/results.md)"),
                        f"{key}_auc_se": (v["auc_se"], f"{k}: its standard error, bootstrap over users"),
                        f"{key}_flops_b{candidates}": (v["flops"], f"{k}: FLOPs of one {candidates}-candidate "
                                                       f"request at L = {v['seq_len']} (loadtests/flops.py)"),
                        f"{key}_ms_b{candidates}": (v["p50_ms"], f"{k}: ORT p50 ms of that request, 1 thread")})
    command = "ctrserve bench cdnet " + " ".join(f"--run {r}" for r in run)
    write_markdown(SECTION, record_section(SECTION, "CDNet: cost against accuracy", command, figures,
                                           machine=machine_facts()))
