"""``ctrserve bench cdnet``: CDNet's cost against its accuracy (docs/models/cdnet.md). Per run
(``--run NAME=DIR``): its test AUC and SE, and for one user and 100 candidates at its history length
the exported graph's FLOPs (loadtests/flops.py) and ORT p50 (1 thread), timed interleaved.
``--full-seq-of NAME``: also NAME's full-sequence graph (k = L, non-sequence head), untrained: cost only."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .harness import failing_as_exit, interleave, machine_facts, ort_session, print_table
from .workload import build_requests, prepared_of


def measure(runs: dict[str, Path], candidates: int = 100, rounds: int = 6, per_round: int = 100,
            full_seq_of: str = "") -> dict[str, Any]:
    """``name -> {auc, auc_se, seq_len, flops, p50_ms}`` for each run (exported to ONNX, parity-gated)."""
    from ctrserve.export import runtimes
    from ctrserve.export.exporter import export_run
    from ctrserve.models.zoo.cdnet import full_sequence_run

    from . import flops
    runtimes.set_threads(1)
    out: dict[str, dict[str, Any]] = {}
    sessions, feeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if full_seq_of:  # beside the run it is built from
            runs = {**runs, f"{full_seq_of}_full_seq": full_sequence_run(runs[full_seq_of], Path(tmp) / "full")}
        for name, run in runs.items():
            # parity on 64 rows: the default 1,000 rows of the full-sequence graph (604 tokens) took 23 GB
            res = export_run(run, "onnx", Path(tmp), name=name, version=1, force=True, parity_rows=64)
            onnx_file = res.version_dir / res.manifest.file
            feed = build_requests(res.manifest, prepared_of(run), [candidates])[candidates]
            metrics, seq = json.loads((Path(run) / "metrics.json").read_text()), res.manifest.feature_map.sequences
            out[name] = {"auc": metrics["auc"], "auc_se": metrics.get("auc_se", float("nan")),
                         "seq_len": seq[0].max_len, "flops": flops.count_flops(onnx_file, feed).total}
            sessions[name], feeds[name] = ort_session(onnx_file), feed
        for name, sess in sessions.items():  # the inputs the graph takes (a first round warms up)
            feeds[name] = {i.name: feeds[name][i.name] for i in sess.get_inputs()}
        samples = interleave({k: lambda _i, s=s, f=feeds[k]: s.run(None, f) for k, s in sessions.items()},
                             rounds, per_round, alternate=True, warmup=1)
    for name, ms in samples.items():
        out[name]["p50_ms"] = float(np.median(ms))
    return out


def cdnet_cmd(
    run: Annotated[list[str], typer.Option(help="NAME=RUN_DIR, repeat (cdnet=.., cdnet_full_seq=.., dcnv2=..)")],
    candidates: Annotated[int, typer.Option(min=1, help="candidates per request")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds")] = 6,
    per_round: Annotated[int, typer.Option(min=1, help="calls per graph per round")] = 100,
    full_seq_of: Annotated[str, typer.Option(help="add this CDNet run's full-sequence graph (cost only)")] = "",
) -> None:
    """Test AUC beside ms and FLOPs per request of each run (CDNet's cost-vs-accuracy table)."""
    from rich.console import Console

    from .report import record_section, write_markdown

    with failing_as_exit(console := Console()):
        pairs = [r.split("=", 1) for r in run]
        if any(len(p) != 2 or not Path(p[1]).is_dir() for p in pairs):
            raise ValueError(f"--run takes NAME=RUN_DIR with an existing run directory, got {run}")
        out = measure({k: Path(v) for k, v in pairs}, candidates, rounds, per_round, full_seq_of)
    print_table(console, f"{candidates} candidates, 1 ORT thread", ("run", "L", "test AUC", "MFLOP", "p50 ms"),
                ((k, str(v["seq_len"]), f"{v['auc']:.4f} ± {v['auc_se']:.4f}", f"{v['flops'] / 1e6:.1f}",
                  f"{v['p50_ms']:.3f}") for k, v in out.items()))
    figures: dict[str, tuple[float, str]] = {}
    for k, v in out.items():
        key, b = (k if k.startswith("cdnet") else f"cdnet_vs_{k}"), candidates  # cdnet_* keys only
        figures.update({f"{key}_flops_b{b}": (v["flops"], f"{k}: FLOPs, {b} candidates at L = {v['seq_len']}"),
                        f"{key}_ms_b{b}": (v["p50_ms"], f"{k}: ORT p50 ms of that request, 1 thread")})
        if not np.isnan(v["auc"]):  # the untrained full-sequence graph has a cost, no accuracy
            figures.update({f"{key}_auc": (v["auc"], f"{k}: test AUC"), f"{key}_auc_se": (v["auc_se"], "its SE")})
    command = "ctrserve bench cdnet " + " ".join(f"--run {r}" for r in run) + f" --full-seq-of {full_seq_of}" * bool(
        full_seq_of)
    write_markdown("cdnet", record_section("cdnet", "CDNet: cost against accuracy", command, figures,
                                           machine=machine_facts()))
