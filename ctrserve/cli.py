"""The ``ctrserve`` command. Each package contributes its own commands; heavy imports
(torch, onnxruntime, redis) happen inside the commands, so ``ctrserve serve`` starts in an
image without torch."""

from __future__ import annotations

import typer

from ctrserve import demo
from ctrserve.models import cli as models_cli

app = typer.Typer(help="ctrserve: train, export and serve click-through-rate models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(models_cli.data_app, name="data")
app.command("train")(models_cli.train_cmd)
app.command("eval")(models_cli.eval_cmd)
app.command("results")(models_cli.results_cmd)
app.command("models")(models_cli.models_cmd)
app.command("demo")(demo.demo_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
