"""``ctrserve bench models``: per-request latency of one exported model by runtime and batch size.

One request = one user (batch-1 user tensors incl. the behaviour sequence) and B candidates
(B = 1, 100, 1000; test-split rows, or the requests ``bench all`` assembles). The runtimes (``WHAT``;
eager through export/runtimes.py, Triton the local tritonserver's Python backend on the same ONNX
file) run on one compute thread each, interleaved in rounds so machine noise hits them alike; the
Triton hop is Triton gRPC's p50 over (and minus) in-process ONNX Runtime's.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ctrserve.launch import Launcher

from .harness import Figures, failing_as_exit, interleave, latency_stats, machine_facts, print_table
from .workload import build_requests, ensure_run, prepared_of

SECTION = "models"
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
WHAT = {"eager": "PyTorch eager (eval, no_grad)", "torchscript": "TorchScript (traced, frozen)",
        "ort": "ONNX Runtime in-process", "triton_grpc": "local Triton over gRPC (Python backend + ORT)",
        "triton_http": "local Triton over HTTP"}


def _triton_runners(server: Any, manifest: Any, name: str, closing: contextlib.ExitStack) -> dict[str, Runner]:
    """Runners of model ``name`` on ``server`` over gRPC and HTTP; their clients close with ``closing``."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    types = {"int64": "INT64", "float32": "FP32"}

    def make(mod: Any, client: Any) -> Runner:
        closing.callback(client.close)

        def run(req: dict[str, np.ndarray]) -> np.ndarray:
            inputs = []
            for t in manifest.inputs:
                i = mod.InferInput(t.name, list(req[t.name].shape), types[t.dtype])
                i.set_data_from_numpy(req[t.name])
                inputs.append(i)
            return client.infer(name, inputs).as_numpy(manifest.output.name)
        return run

    return {"triton_grpc": make(tg, tg.InferenceServerClient(server.grpc_url)),
            "triton_http": make(th, th.InferenceServerClient(server.http_url.removeprefix("http://")))}


@contextlib.contextmanager
def runtimes(run_dir: Path, threads: int, parity_rows: int | None) -> Iterator[tuple[dict[str, Runner], Any]]:
    """(runtime name -> runner, the ONNX manifest): the run exported to ONNX and TorchScript in a
    scratch repository, the ONNX file also served by a local tritonserver; all stopped on exit."""
    from ctrserve.export import runtimes as torch_runtimes
    from ctrserve.export import triton_local
    from ctrserve.export.exporter import export_run
    from ctrserve.export.parity import onnx_runner, torchscript_runner

    torch_runtimes.set_threads(threads)
    parity = {} if parity_rows is None else {"parity_rows": parity_rows}
    with contextlib.ExitStack() as closing:
        repo = Path(closing.enter_context(tempfile.TemporaryDirectory(prefix="ctrserve-bench-repo-")))
        launcher = closing.enter_context(Launcher())
        onnx_m = export_run(run_dir, "onnx", repo, name="bench", **parity).manifest
        ts_m = export_run(run_dir, "torchscript", repo, name="bench_ts", **parity).manifest
        eager = torch_runtimes.EagerModel(run_dir)
        server = closing.enter_context(triton_local.start(repo, models=["bench"], launcher=launcher))
        yield {"eager": eager,
               "torchscript": torchscript_runner(repo / "bench_ts" / "1" / ts_m.file,
                                                 eager.user_inputs + eager.candidate_inputs),
               "ort": onnx_runner(repo / "bench" / "1" / onnx_m.file, threads),
               **_triton_runners(server, onnx_m, "bench", closing)}, onnx_m


def _check_agree(runners: dict[str, Runner], requests: dict[int, dict[str, np.ndarray]]) -> None:
    """Warm every runtime up (10 calls) and check it agrees with ONNX Runtime."""
    for b, req in requests.items():
        ref = runners["ort"](req)
        for name, fn in runners.items():
            for _ in range(10):
                out = fn(req)
            if out.shape != (b,) or np.max(np.abs(out - ref)) > 1e-4:
                raise RuntimeError(f"{name} disagrees with ONNX Runtime at B={b}")


def model_figures(lat: dict[str, dict[str, float]], names: list[str], batches: list[int]) -> Figures:
    fig = Figures()
    for b in batches:
        for n in names:
            fig.add(f"{n}_p50_ms_b{b}", round(lat[f"{n}_b{b}"]["p50"], 4), f"{WHAT[n]}, 1 user + {b} candidates, p50")
            fig.add(f"{n}_p99_ms_b{b}", round(lat[f"{n}_b{b}"]["p99"], 4), "same, p99")
        ort, tri = lat[f"ort_b{b}"]["p50"], lat[f"triton_grpc_b{b}"]["p50"]
        fig.add(f"triton_hop_ms_batch{b}", round(tri - ort, 4), f"Triton gRPC p50 - ORT in-process p50 at B={b}")
        fig.add(f"triton_hop_ratio_b{b}", round(tri / ort, 3), f"Triton gRPC p50 / ORT in-process p50 at B={b}")
    return fig


def run_bench(run_dir: Path | None = None, batches: list[int] | None = None, rounds: int = 3, per_round: int = 100,
              threads: int = 1, record: bool = True, requests: dict[int, dict[str, np.ndarray]] | None = None,
              per_round_large: int | None = None, parity_rows: int | None = None) -> dict[str, Any]:
    """Time every runtime on the same requests. ``requests`` (B -> named inputs, e.g. assembled by
    the gateway's code from the feature store) replaces the test-split requests; batches above 100
    candidates run ``per_round_large`` requests per round (default ``per_round``)."""
    import onnxruntime

    from ctrserve.export.runtimes import torch_facts

    batches = sorted(requests) if requests else (batches or [1, 100, 1000])
    run_dir = Path(run_dir) if run_dir else ensure_run()
    source = "the given requests" if requests else "test-split rows"
    with runtimes(run_dir, threads, parity_rows) as (runners, onnx_m):
        requests = requests or build_requests(onnx_m, prepared_of(run_dir), batches)
        _check_agree(runners, requests)
        large = per_round if per_round_large is None else per_round_large
        variants = {f"{n}_b{b}": (lambda _i, fn=fn, req=req: fn(req)) for b, req in requests.items()
                    for n, fn in runners.items()}
        counts = {key: per_round if int(key.rsplit("_b", 1)[1]) <= 100 else large for key in variants}
        samples = interleave(variants, rounds, counts)
    lat = {key: latency_stats(ms) for key, ms in samples.items()}
    fig = model_figures(lat, list(runners), batches)
    if record:
        seq = onnx_m.feature_map.sequence_fields
        notes = [
            f"Model: {onnx_m.model} on {onnx_m.dataset} ({onnx_m.metrics.get('params', '?')} parameters), run "
            f"`{run_dir.name}`; sequence length {seq[0].max_len if seq else 0}; inputs: {len(onnx_m.user_inputs)} "
            f"user-side (batch 1), {len(onnx_m.candidate_inputs)} candidate-side (batch B).",
            f"Requests: {source}. {rounds} interleaved rounds x {per_round} requests per runtime and batch size "
            f"({large} above 100 candidates), after 10 warm-up calls; every runtime {threads} compute thread; "
            "client, tritonserver and its Python-backend stub share the machine's 2 cores with other work (see "
            "load_avg_1m).",
            "Triton = the nvidia-pytriton binary's Python backend running the same model.onnx with ONNX Runtime "
            "(docs/export.md); the NVIDIA container's native onnxruntime backend would avoid the stub's IPC hop.",
        ]
        facts = machine_facts(torch=torch_facts()["torch"], onnxruntime=onnxruntime.__version__)
        fig.record(SECTION, "Model runtimes: eager, TorchScript, ONNX Runtime, local Triton", "ctrserve bench models",
                   notes, facts)
    return {"run_dir": str(run_dir), "model": onnx_m.model, "dataset": onnx_m.dataset, "latency_ms": lat,
            "figures": fig.values(), "n": rounds * per_round}


def models_cmd(
    run: Annotated[Path | None, typer.Option(help="run directory (default: the benchmark run)")] = None,
    batch: Annotated[list[int] | None, typer.Option(help="candidates per request (repeat)")] = None,
    rounds: Annotated[int, typer.Option(help="interleaved measuring rounds")] = 3,
    per_round: Annotated[int, typer.Option(help="requests per runtime, batch size and round")] = 100,
    threads: Annotated[int, typer.Option(help="compute threads per runtime")] = 1,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json and .md")] = True,
) -> None:
    """Latency per request of eager / TorchScript / ONNX Runtime / local Triton at B = 1, 100, 1000."""
    from rich.console import Console

    console = Console()
    with failing_as_exit(console):
        out = run_bench(run, batch, rounds, per_round, threads, record)
    print_table(console, f"{out['model']} on {out['dataset']}: ms per request ({out['n']} requests each)",
                ("runtime", "B", "p50", "p99", "mean"),
                ((*key.rsplit("_b", 1), *(f"{s[k]:.3f}" for k in ("p50", "p99", "mean")))
                 for key, s in out["latency_ms"].items()))
    console.print({k: v for k, v in out["figures"].items() if k.startswith("triton_hop")})
