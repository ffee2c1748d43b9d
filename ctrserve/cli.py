"""The ``ctrserve`` command. Each package contributes its own commands; heavy imports
(torch, onnxruntime, redis) happen inside the commands, so ``ctrserve serve`` starts in an
image without torch."""

from __future__ import annotations

import typer

from ctrserve import demo
from ctrserve.ab import ab_app
from ctrserve.export import cli as export_cli
from ctrserve.feature_store.cli import store_app
from ctrserve.loadtests.cli import bench_app
from ctrserve.models import cli as models_cli
from ctrserve.models.calibrate import calibrate_cmd
from ctrserve.models.contest import contest_cmd
from ctrserve.service.cli import serve_cmd

app = typer.Typer(help="ctrserve: train, export and serve click-through-rate models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(models_cli.data_app, name="data")
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
app.add_typer(ab_app, name="ab")
app.command("train")(models_cli.train_cmd)
app.command("eval")(models_cli.eval_cmd)
app.command("results")(models_cli.results_cmd)
app.command("tune")(models_cli.tune_cmd)
app.command("models")(models_cli.models_cmd)
app.command("calibrate")(calibrate_cmd)
app.command("contest")(contest_cmd)
app.command("demo")(demo.demo_cmd)
app.command("export")(export_cli.export_cmd)
app.command("triton")(export_cli.triton_cmd)
app.command("serve")(serve_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
