"""``ctrserve bench models``: per-request latency of one exported model by runtime and batch size.

One request = one user (batch-1 user tensors incl. the behaviour sequence) and B candidates
(B = 1, 100, 1000), built from the run's test split. Runtimes, all single-threaded so they
compare like for like on a 2-core machine:

* ``eager``        PyTorch eval mode, the serving wrapper, ``torch.no_grad``
* ``torchscript``  the exported, frozen ``model.pt`` (warmed up: the profiling executor
  specialises on the first calls)
* ``ort``          ONNX Runtime in-process on the exported ``model.onnx`` (1 intra-op thread,
  no spinning): what the gateway's embedded backend does
* ``triton_grpc`` / ``triton_http``  the same ONNX file through the local tritonserver
  (Python backend -> ONNX Runtime), tritonclient on the same machine

The Triton hop is reported as ``triton_hop_ms_batchB`` (triton gRPC p50 - ORT p50) and
``triton_hop_ratio_bB`` (triton gRPC p50 / ORT p50). Variants run interleaved in rounds so
machine noise hits them alike.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

SECTION = "models"
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def default_run() -> Path:
    """The newest synthetic-dataset DNN run (a sequence model the size served here)."""
    from ctrserve.paths import settings

    runs = sorted((settings().runs_dir / "synthetic" / "dnn").glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError("no run found: train one (`ctrserve train --model dnn --dataset synthetic`) or pass --run")
    return runs[-1].parent


def build_requests(manifest: Any, prepared: Path, batches: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """One user's tensors (the first test row with a non-empty history) and B candidates (test rows)."""
    from ctrserve.contract.prepared import load_split

    arrays = load_split(prepared, "test")
    seq = [f.name for f in manifest.feature_map.sequence_fields]
    row = int(np.flatnonzero((arrays[seq[0]] != 0).any(axis=1))[0]) if seq else 0
    n = len(arrays[manifest.candidate_inputs[0].name])
    out = {}
    for b in batches:
        idx = np.arange(b) % n
        out[b] = {t.name: np.ascontiguousarray(arrays[t.name][[row]] if t.side == "user" else arrays[t.name][idx])
                  for t in manifest.inputs}
    return out


def _triton_runners(server: Any, manifest: Any, name: str) -> tuple[dict[str, Runner], Callable[[], None]]:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    types = {"int64": "INT64", "float32": "FP32"}
    grpc = tg.InferenceServerClient(server.grpc_url)
    http = th.InferenceServerClient(server.http_url.removeprefix("http://"))

    def make(mod: Any, client: Any) -> Runner:
        def run(req: dict[str, np.ndarray]) -> np.ndarray:
            inputs = []
            for t in manifest.inputs:
                i = mod.InferInput(t.name, list(req[t.name].shape), types[t.dtype])
                i.set_data_from_numpy(req[t.name])
                inputs.append(i)
            return client.infer(name, inputs).as_numpy(manifest.output.name)
        return run

    def close() -> None:
        grpc.close()
        http.close()

    return {"triton_grpc": make(tg, grpc), "triton_http": make(th, http)}, close


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def run_bench(run_dir: Path | None = None, batches: list[int] | None = None, rounds: int = 3, per_round: int = 100,
        threads: int = 1, record: bool = True, requests: dict[int, dict[str, np.ndarray]] | None = None,
        per_round_large: int | None = None, parity_rows: int | None = None) -> dict[str, Any]:
    """Time every runtime on the same requests. ``requests`` (B -> named inputs, e.g. assembled by
    the gateway's code from the feature store) replaces the test-split requests; batches above 100
    candidates run ``per_round_large`` requests per round (default ``per_round``)."""
    import torch

    from ctrserve.export import triton_local
    from ctrserve.export.exporter import export_run
    from ctrserve.export.parity import onnx_runner
    from ctrserve.export.serving_module import as_tensors, build_serving_module
    from ctrserve.models.train.trainer import load_run

    from .report import machine_facts, record_section, write_markdown

    batches = sorted(requests) if requests else (batches or [1, 100, 1000])
    run_dir = Path(run_dir) if run_dir else default_run()
    torch.set_num_threads(threads)
    repo = Path(tempfile.mkdtemp(prefix="ctrserve-bench-repo-"))
    parity = {} if parity_rows is None else {"parity_rows": parity_rows}
    onnx_m = export_run(run_dir, "onnx", repo, name="bench", **parity).manifest
    ts_m = export_run(run_dir, "torchscript", repo, name="bench_ts", **parity).manifest
    prepared = Path((run_dir / "prepared_dir.txt").read_text().strip())
    source = "the given requests" if requests else "test-split rows"
    requests = requests or build_requests(onnx_m, prepared, batches)

    _, fmap, model = load_run(run_dir)
    wrapper = build_serving_module(model, fmap).eval()
    script = torch.jit.load(str(repo / "bench_ts" / "1" / ts_m.file))

    def torch_runner(module: Any) -> Runner:
        @torch.no_grad()
        def go(req: dict[str, np.ndarray]) -> np.ndarray:
            return module(*as_tensors(wrapper, req)).numpy()
        return go

    runners: dict[str, Runner] = {"eager": torch_runner(wrapper), "torchscript": torch_runner(script),
                                  "ort": onnx_runner(repo / "bench" / "1" / onnx_m.file, threads)}
    server = triton_local.start(repo, models=["bench"])
    close: Callable[[], None] | None = None
    try:
        triton, close = _triton_runners(server, onnx_m, "bench")
        runners.update(triton)
        for b, req in requests.items():  # warm-up and a sanity check: every runtime agrees
            ref = runners["ort"](req)
            for name, fn in runners.items():
                for _ in range(10):
                    out = fn(req)
                if out.shape != (b,) or np.max(np.abs(out - ref)) > 1e-4:
                    raise RuntimeError(f"{name} disagrees with ONNX Runtime at B={b}")
        samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in runners for b in batches}
        for _ in range(rounds):
            for b, req in requests.items():
                for name, fn in runners.items():
                    acc = samples[(name, b)]
                    for _ in range(per_round if b <= 100 or per_round_large is None else per_round_large):
                        t0 = time.perf_counter()
                        fn(req)
                        acc.append(time.perf_counter() - t0)
    finally:
        if close is not None:
            close()
        server.stop()
        shutil.rmtree(repo, ignore_errors=True)
    lat = {f"{n}_b{b}": _percentiles(s) for (n, b), s in samples.items()}
    figures: dict[str, tuple[float, str]] = {}
    what = {"eager": "PyTorch eager (eval, no_grad)", "torchscript": "TorchScript (traced, frozen)",
            "ort": "ONNX Runtime in-process", "triton_grpc": "local Triton over gRPC (Python backend + ORT)",
            "triton_http": "local Triton over HTTP"}
    for b in batches:
        for n in runners:
            stats = lat[f"{n}_b{b}"]
            figures[f"{n}_p50_ms_b{b}"] = (round(stats["p50"], 4), f"{what[n]}, 1 user + {b} candidates, p50")
            figures[f"{n}_p99_ms_b{b}"] = (round(stats["p99"], 4), "same, p99")
        ort, tri = lat[f"ort_b{b}"]["p50"], lat[f"triton_grpc_b{b}"]["p50"]
        figures[f"triton_hop_ms_batch{b}"] = (round(tri - ort, 4), f"Triton gRPC p50 - ORT in-process p50 at B={b}")
        figures[f"triton_hop_ratio_b{b}"] = (round(tri / ort, 3), f"Triton gRPC p50 / ORT in-process p50 at B={b}")
    out = {"run_dir": str(run_dir), "model": onnx_m.model, "dataset": onnx_m.dataset, "latency_ms": lat,
           "figures": {k: v for k, (v, _) in figures.items()}, "n": rounds * per_round}
    if record:
        seq = onnx_m.feature_map.sequence_fields
        notes = [
            f"Model: {onnx_m.model} on {onnx_m.dataset} ({onnx_m.metrics.get('params', '?')} parameters), run "
            f"`{run_dir.name}`; sequence length {seq[0].max_len if seq else 0}; inputs: {len(onnx_m.user_inputs)} "
            f"user-side (batch 1), {len(onnx_m.candidate_inputs)} candidate-side (batch B).",
            f"Requests: {source}. {rounds} interleaved rounds x {per_round} requests per runtime and batch size "
            f"({per_round_large if per_round_large is not None else per_round} above 100 candidates), after 10 "
            "warm-up calls; "
            f"every runtime {threads} compute thread; client, tritonserver and its Python-backend stub share the "
            "machine's 2 cores with other work (see load_avg_1m).",
            "Triton = the nvidia-pytriton binary's Python backend running the same model.onnx with ONNX Runtime "
            "(docs/export.md); the NVIDIA container's native onnxruntime backend would avoid the stub's IPC hop.",
        ]
        import onnxruntime

        data = record_section(SECTION, "Model runtimes: eager, TorchScript, ONNX Runtime, local Triton",
                              "ctrserve bench models", figures, notes,
                              machine_facts(torch=torch.__version__, onnxruntime=onnxruntime.__version__))
        write_markdown(SECTION, data)
    return out


def models_cmd(
    run: Annotated[Path | None, typer.Option(help="run directory (default: newest synthetic dnn run)")] = None,
    batch: Annotated[list[int] | None, typer.Option(help="candidates per request (repeat)")] = None,
    rounds: Annotated[int, typer.Option(help="interleaved measuring rounds")] = 3,
    per_round: Annotated[int, typer.Option(help="requests per runtime, batch size and round")] = 100,
    threads: Annotated[int, typer.Option(help="compute threads per runtime")] = 1,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json and .md")] = True,
) -> None:
    """Latency per request of eager / TorchScript / ONNX Runtime / local Triton at B = 1, 100, 1000."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        out = run_bench(run, batch, rounds, per_round, threads, record)
    except (RuntimeError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"{out['model']} on {out['dataset']}: ms per request ({out['n']} requests each)")
    for col in ("runtime", "B", "p50", "p99", "mean"):
        table.add_column(col)
    for key, s in out["latency_ms"].items():
        name, b = key.rsplit("_b", 1)
        table.add_row(name, b, f"{s['p50']:.3f}", f"{s['p99']:.3f}", f"{s['mean']:.3f}")
    console.print(table)
    console.print({k: v for k, v in out["figures"].items() if k.startswith("triton_hop")})


if __name__ == "__main__":
    typer.run(models_cmd)
