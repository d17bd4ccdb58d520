"""The command line: `python -m pipeline <stage>`, one command per DVC stage plus the tools.

Each command is a thin adapter: read `params.yaml` (never a hyperparameter flag that DVC would not
see), call the stage's function. A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import STRATEGIES, Params, load_params
from pipeline.errors import UserError
from pipeline.paths import Paths, workspace_paths

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="ASL alphabet pipeline: one command per DVC stage, plus tools.",
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
        except Exception as err:
            lost = _lost_tracking_server(err)
            if lost is None:
                raise
            print(f"error: {lost}", file=sys.stderr)
            raise typer.Exit(lost.exit_code) from None

    return wrapper


def _lost_tracking_server(err: Exception) -> UserError | None:
    """The one-line error for an MLflow call that could not reach the tracking server, else None."""
    if "mlflow" not in sys.modules:
        return None
    from pipeline.tracking import unreachable, unreachable_error

    return unreachable_error(err) if unreachable(err) else None


WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        help="folder whose data/, models/ and metrics/ to use (default: the one holding dvc.yaml)",
    ),
]


def _load(params_file: Path, workspace: Path | None = None) -> tuple[Params, Paths]:
    return load_params(params_file), Paths(workspace.resolve()) if workspace else workspace_paths()


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
    strategy: Annotated[
        str,
        typer.Argument(
            help="dp (DataParallel) or ddp (DistributedDataParallel via torchrun)", callback=_strategy
        ),
    ],
    params_file: ParamsFile = Path("params.yaml"),
    workspace: WorkspaceOption = None,
) -> None:
    """Train the classifier under one strategy; ddp starts torchrun with `gpus` processes per node."""
    from pipeline.train import run_train

    code = run_train(*_load(params_file, workspace), strategy, params_file)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def evaluate(
    strategy: Annotated[
        str, typer.Argument(help="which trained model to evaluate: dp or ddp", callback=_strategy)
    ],
    params_file: ParamsFile = Path("params.yaml"),
) -> None:
    """Measure models/<strategy> on the validation split and test sets; log into its training's MLflow run."""
    from pipeline.evaluate import run_evaluate

    run_evaluate(*_load(params_file), strategy)


@app.command()
@user_errors
def promote(params_file: ParamsFile = Path("params.yaml")) -> None:
    """Register the better evaluated model, point `candidate` at it, and move `champion` if it wins."""
    from pipeline.promote import run_promote

    run_promote(*_load(params_file))


@app.command()
@user_errors
def scaling(params_file: ParamsFile = Path("params.yaml")) -> None:
    """Train dp and ddp for every count in scaling.gpu_counts; write reports/scaling/ (figure, CSV)."""
    from pipeline.scaling import run_scaling

    run_scaling(*_load(params_file))


@app.command()
@user_errors
def predict(
    images: Annotated[
        list[Path],
        typer.Argument(help="image files, or folders of .jpg/.jpeg/.png images (searched recursively)"),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder "
            "[default: the champion]",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="classes to show per image")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    params_file: ParamsFile = Path("params.yaml"),
) -> None:
    """Classify images with the registered champion (or --model); exit code 1 if any image failed."""
    from pipeline.predict import run_predict
    from pipeline.registry import champion_uri

    # params.yaml only names the default model: with --model the command runs anywhere.
    uri = model or champion_uri(load_params(params_file).mlflow.registered_model)
    code = run_predict(images, uri, top_k, as_json)
    if code:
        raise typer.Exit(code)


@app.command("serve-ui")
@user_errors
def serve_ui(
    model: Annotated[
        str | None,
        typer.Option("--model", help="model to serve (any --model of `predict`) [default: the champion]"),
    ] = None,
    params_file: ParamsFile = Path("params.yaml"),
) -> None:
    """Serve the web page: upload or photograph a sign, see the prediction (serve.host:serve.port)."""
    from pipeline.registry import champion_uri
    from pipeline.webapp import run_server

    params = load_params(params_file)
    run_server(model or champion_uri(params.mlflow.registered_model), params.serve)


@app.command("team-server")
@user_errors
def team_server(
    folder: Annotated[
        Path, typer.Option("--folder", help="where PostgreSQL's data, the artifacts and the logs live")
    ] = Path("team-server"),
    host: Annotated[
        str, typer.Option("--host", help="address to listen on: loopback, or 0.0.0.0 for a team's network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="port of the MLflow server")] = 5000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="MLflow server worker processes")] = 2,
) -> None:
    """Run a team's MLflow tracking server here: PostgreSQL store, proxied artifacts; Ctrl-C stops it."""
    from pipeline.team_server import run_team_server

    run_team_server(folder, host, port, workers)


@app.command("node-params")
@user_errors
def node_params(
    nnodes: Annotated[
        int, typer.Option("--nnodes", help="nodes in the job (SLURM_NNODES, or WORLD_SIZE of a PyTorchJob)")
    ],
    node_rank: Annotated[
        int, typer.Option("--node-rank", help="this node's rank (SLURM_NODEID, or RANK of a PyTorchJob)")
    ],
    rdzv_endpoint: Annotated[
        str, typer.Option("--rdzv-endpoint", help="host:port of node 0, where torchrun meets")
    ],
    out: Annotated[Path, typer.Option("--out", help="params file to write for this node")],
    params_file: ParamsFile = Path("params.yaml"),
) -> None:
    """Write this node's params for a multi-node `train ddp` launched by a cluster (SLURM, Kubernetes)."""
    from pipeline.cluster import write_node_params

    print(write_node_params(params_file, nnodes, node_rank, rdzv_endpoint, out))
