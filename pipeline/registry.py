"""What the stages and the serving tools share about MLflow records: the registry's aliases, and
the `run.json` that links a model folder to the run that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError

CANDIDATE = "candidate"
CHAMPION = "champion"


def champion_uri(registered_model: str) -> str:
    return f"models:/{registered_model}@{CHAMPION}"


def read_run_info(model_dir: Path, strategy: str) -> dict[str, str]:
    """`run.json` of a training (run_id, experiment_id, model_uri); a UserError if training has not run."""
    run_file = model_dir / "run.json"
    if not model_dir.is_dir() or not run_file.is_file():
        missing = model_dir if not model_dir.is_dir() else run_file
        raise UserError(f"{missing} is missing: run `dvc repro train@{strategy}` first")
    try:
        info = json.loads(run_file.read_text())
    except json.JSONDecodeError:
        raise UserError(
            f"{run_file} is not valid JSON: run `dvc repro -f train@{strategy}` to rewrite it"
        ) from None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("run_id", "model_uri")):
        raise UserError(
            f"{run_file} lacks run_id/model_uri: run `dvc repro -f train@{strategy}` to rewrite it"
        )
    return info


def existing_run(run_info: dict, model_dir: Path, strategy: str) -> str:
    """The run id from run.json, after checking that the configured MLflow store holds that run."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import unreachable

    try:
        MlflowClient().get_run(run_info["run_id"])
    except MlflowException as err:
        if unreachable(err):
            raise
        raise UserError(
            f"MLflow run {run_info['run_id']} named in {model_dir / 'run.json'} is not in the store "
            f"{mlflow.get_tracking_uri()}: run `dvc repro -f train@{strategy}` "
            "(or set MLFLOW_TRACKING_URI to the store it was trained with)"
        ) from None
    return run_info["run_id"]
