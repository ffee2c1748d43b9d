"""``ctrserve bench ...``: benchmarks that write their figures to docs/benchmarks.json and .md.
Heavy imports happen inside the commands."""

from __future__ import annotations

import typer

from .bench_ab import ab_cmd
from .bench_all import all_cmd
from .bench_cdnet import cdnet_cmd
from .bench_graph import graph_cmd
from .bench_load import load_cmd
from .bench_models import models_cmd
from .bench_store import store_cmd

bench_app = typer.Typer(help="Benchmarks (figures go to docs/benchmarks.json and docs/benchmarks.md).",
                        no_args_is_help=True)
for name, command in {"store": store_cmd, "models": models_cmd, "load": load_cmd, "all": all_cmd,
                      "graph": graph_cmd, "ab": ab_cmd, "cdnet": cdnet_cmd}.items():
    bench_app.command(name)(command)
