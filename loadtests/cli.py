"""``ctrserve bench ...``: benchmarks that write their figures to docs/benchmarks.json and .md.
Heavy imports happen inside the commands."""

from __future__ import annotations

from typing import Annotated

import typer

from .bench_all import all_cmd
from .bench_graph import graph_cmd
from .bench_load import load_cmd
from .bench_models import models_cmd

bench_app = typer.Typer(help="Benchmarks (figures go to docs/benchmarks.json and docs/benchmarks.md).",
                        no_args_is_help=True)


@bench_app.command("store")
def store_cmd(
    users: Annotated[int, typer.Option(help="users loaded (each with a full sequence)")] = 1000,
    items: Annotated[int, typer.Option(help="items loaded")] = 5000,
    max_len: Annotated[int, typer.Option(help="sequence length L")] = 600,
    candidates: Annotated[int, typer.Option(help="candidate items per request")] = 100,
    rounds: Annotated[int, typer.Option(help="interleaved measuring rounds")] = 4,
    per_round: Annotated[int, typer.Option(help="requests per variant per round")] = 500,
    record: Annotated[bool, typer.Option(help="write docs/benchmarks.json and .md")] = True,
) -> None:
    """p50/p99 of one request's feature fetch (user + candidates) against a private redis-server."""
    from rich.console import Console
    from rich.table import Table

    from .bench_store import run

    console = Console()
    try:
        out = run(users, items, max_len, candidates, rounds, per_round, record)
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"one request: user L={max_len} + {candidates} items ({out['n']} requests per variant)")
    for col in ("variant", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col)
    for name, lat in out["latency_ms"].items():
        table.add_row(name, f"{lat['p50']:.3f}", f"{lat['p99']:.3f}", f"{lat['mean']:.3f}")
    console.print(table)
    console.print(out["figures"])


bench_app.command("models")(models_cmd)
bench_app.command("load")(load_cmd)
bench_app.command("all")(all_cmd)
bench_app.command("graph")(graph_cmd)
