"""``ctrserve export`` and ``ctrserve triton``. Heavy imports (torch) happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

console = Console()


def export_cmd(
    out: Annotated[Path, typer.Option(help="Triton model repository to write into")],
    run: Annotated[Path | None, typer.Option(help="run directory written by `ctrserve train`")] = None,
    format: Annotated[Literal["onnx", "torchscript"], typer.Option("--format", help="artefact format")] = "onnx",
    name: Annotated[str | None, typer.Option(help="model name in the repository (default: registry name)")] = None,
    version: Annotated[int | None, typer.Option(help="version number (default: next free)")] = None,
    flavour: Annotated[Literal["local", "deploy"], typer.Option(
        help="config.pbtxt for the local nvidia-pytriton binary (python backend) or the Triton container")] = "local",
    version_policy: Annotated[str, typer.Option(help="latest:N | all | specific:1,2")] = "latest:1",
    gpu: Annotated[bool, typer.Option(help="deploy flavour: KIND_GPU instances")] = False,
    instances: Annotated[int, typer.Option(help="model instances")] = 1,
    threads: Annotated[int, typer.Option(help="compute threads per instance")] = 1,
    max_batch_requests: Annotated[int, typer.Option(
        help="models with the multi-user graph: requests Triton may merge into one execution (0: none)")] = 16,
    max_queue_delay_us: Annotated[int, typer.Option(
        help="Triton dynamic batcher: how long a request may wait for others to merge with")] = 100,
    parity_rows: Annotated[int, typer.Option(help="held-out rows for the parity gate (>= 1000)")] = 1000,
    tolerance: Annotated[float, typer.Option(help="max abs difference of probabilities")] = 1e-4,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing version directory")] = False,
    grouped: Annotated[bool, typer.Option(
        help="also export the multi-user graph (user inputs [R, ...], user_index [B]) behind its own gate")] = False,
    config_only: Annotated[bool, typer.Option(
        help="only regenerate --out/--name/config.pbtxt (e.g. another --flavour) from the exported manifests")] = False,
) -> None:
    """Export a trained run to ONNX or TorchScript, gate it on parity, add it to a Triton repository."""
    from pydantic import ValidationError

    # no torch before the --config-only branch: it runs in the serving image, which has none
    from .triton_repo import RepoOptions, write_config

    try:
        options = RepoOptions(flavour=flavour, version_policy=version_policy, gpu=gpu, instances=instances,
                              threads=threads, max_batch_requests=max_batch_requests,
                              max_queue_delay_us=max_queue_delay_us)
    except ValidationError as exc:
        console.print(f"[red]error:[/] {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from None
    if config_only:
        if not name:
            console.print("[red]error:[/] --config-only needs --name")
            raise typer.Exit(2)
        try:
            console.print(f"wrote {write_config(out / name, options)} ({flavour} flavour)")
        except FileNotFoundError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        return
    if run is None:
        console.print("[red]error:[/] --run is required (unless --config-only)")
        raise typer.Exit(2)
    from .exporter import ExportError, export_run
    from .parity import ParityError

    if parity_rows < 1000:
        console.print(f"[yellow]warning:[/] --parity-rows {parity_rows} is below the 1,000 rows the gate is meant for")
    try:
        result = export_run(run, format, out, name=name, version=version, options=options, parity_rows=parity_rows,
                            tolerance=tolerance, opset=opset, force=force, grouped=grouped)
    except ParityError as exc:
        console.print(f"[red]export failed the parity gate; nothing was written[/]\n{exc}")
        raise typer.Exit(1) from None
    except (ExportError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    m = result.manifest
    console.print(m.parity.report())
    if m.grouped is not None:
        console.print(f"multi-user graph {m.grouped.file}: {m.grouped.parity.report()}")
        if m.grouped.ragged is not None:
            console.print(f"ragged graph for Triton {m.grouped.ragged.file}: {m.grouped.ragged.parity.report()}")
        else:
            console.print(f"[yellow]no ragged graph for Triton:[/] {m.grouped.ragged_reason}")
    elif grouped:
        console.print(f"[yellow]no multi-user graph:[/] {m.grouped_reason}")
    console.print(f"[bold green]{m.name}[/] version {m.version} ({m.format}, {m.exporter.tool}"
                  f"{f', opset {m.exporter.opset}' if m.exporter.opset else ''}) -> {result.version_dir}\n"
                  f"config ({flavour}): {result.config_path}: {result.config_path.read_text().splitlines()[1][2:]}")
    if m.exporter.fallback_reason:
        console.print(f"[yellow]fell back to the legacy exporter:[/] {m.exporter.fallback_reason}")


def triton_cmd(
    model_repo: Annotated[Path, typer.Option(help="Triton model repository (local flavour configs)")],
    http_port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port")] = 8002,
    host: Annotated[str, typer.Option(
        help="address HTTP, gRPC and metrics bind to (loopback by default; 0.0.0.0 for every interface)")
    ] = "127.0.0.1",
    model: Annotated[list[str] | None, typer.Option(help="model to load at start (repeat; default: all)")] = None,
    log_file: Annotated[Path | None, typer.Option(help="server log (default: a temp file)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for readiness")] = 120,
) -> None:
    """Run the local tritonserver (nvidia-pytriton) with explicit model control until Ctrl-C/SIGTERM."""
    from ctrserve.launch import Interrupted, Launcher

    from .triton_local import TritonError, start

    with Launcher() as launcher:
        try:
            server = start(model_repo, http_port, grpc_port, metrics_port, models=model, timeout=timeout,
                           log_path=log_file, host=host, launcher=launcher)
        except TritonError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except Interrupted:
            console.print("interrupted while starting; tritonserver stopped")
            raise typer.Exit(1) from None
        try:  # from here on, SIGINT/SIGTERM is the way to stop
            ready = ", ".join(f"{m['name']}/{m.get('version', '-')}:{m.get('state', 'UNAVAILABLE')}"
                              for m in server.index())
            console.print(f"[bold green]tritonserver ready[/] http {server.http_url}  grpc {server.grpc_url}  "
                          f"metrics {server.metrics_url} (bound to {host})\nmodels: {ready or 'none'}\n"
                          f"log: {server.log_path}")
            launcher.wait_any()
        except Interrupted as signal_:
            console.print(f"{signal_.name}: stopping tritonserver ...")
            code = server.stop()
            console.print(f"stopped (exit code {code})")
            return
        console.print(f"[red]tritonserver exited with code {server.process.returncode}[/]\n{server.log_tail()}")
        raise typer.Exit(1)
