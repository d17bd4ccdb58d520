"""The command line: `python -m pipeline <stage>`, one command per DVC stage plus the tools.

Each command is a thin adapter: read `params.yaml` (never a hyperparameter flag that DVC would not
see), call the stage's function. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer

from pipeline.config import STRATEGIES, Params, load_params
from pipeline.errors import UserError
from pipeline.paths import Paths, workspace_paths

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help="ASL alphabet pipeline: one command per DVC stage, plus tools."
)

ParamsFile = Annotated[Path, typer.Option("--params", help="params file to read", show_default=True)]


def user_errors(command: Callable) -> Callable:
    """Turn a UserError into one line and exit code 2; anything else keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(err.exit_code) from None

    return wrapper


def _load(params_file: Path) -> tuple[Params, Paths]:
    return load_params(params_file), workspace_paths()


def _strategy(value: str) -> str:
    if value not in STRATEGIES:
        raise typer.BadParameter(f"{value!r} is not a strategy: use one of {', '.join(STRATEGIES)}")
    return value


@app.command()
@user_errors
def fetch(params_file: ParamsFile = Path("params.yaml")) -> None:
    """Write data/raw/ in the Kaggle layout from data.source."""
    from pipeline.fetch import run_fetch

    run_fetch(*_load(params_file))


@app.command()
@user_errors
def preprocess(params_file: ParamsFile = Path("params.yaml")) -> None:
    """Decode, split and normalize data/raw/ into tensor shards under data/shards/."""
    from pipeline.preprocess import run_preprocess

    run_preprocess(*_load(params_file))


@app.command()
@user_errors
def train(
    strategy: Annotated[str, typer.Argument(help="dp (DataParallel) or ddp (DistributedDataParallel via torchrun)", callback=_strategy)],
    params_file: ParamsFile = Path("params.yaml"),
) -> None:
    """Train the classifier under one strategy; ddp starts torchrun with `gpus` processes per node."""
    from pipeline.train import run_train

    code = run_train(*_load(params_file), strategy, params_file)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def evaluate(
    strategy: Annotated[str, typer.Argument(help="which trained model to evaluate: dp or ddp", callback=_strategy)],
    params_file: ParamsFile = Path("params.yaml"),
) -> None:
    """Measure models/<strategy> on the validation split and the test folder; log into its training's MLflow run."""
    from pipeline.evaluate import run_evaluate

    run_evaluate(*_load(params_file), strategy)


@app.command()
@user_errors
def promote(params_file: ParamsFile = Path("params.yaml")) -> None:
    """Register the better evaluated model, point `candidate` at it, and move `champion` if it wins."""
    from pipeline.promote import run_promote

    run_promote(*_load(params_file))
