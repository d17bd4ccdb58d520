"""MLflow plumbing every stage shares: the store, the experiment, and runs with the house tags.

The store is `sqlite:///<repository>/mlruns/mlflow.db` unless `MLFLOW_TRACKING_URI` says otherwise;
a run ends FAILED, never RUNNING, when its stage raises, is interrupted or is terminated.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.devices import device_label
from pipeline.paths import repository_root

# MLflow phones home by default; these machines have no internet and runs must not wait on it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow  # noqa: E402  (after the telemetry switch)
from filelock import FileLock  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402


def store_dir() -> Path:
    """Folder of the sqlite store and its artifacts: `<repository>/mlruns`, or the folder of the
    sqlite file that `MLFLOW_TRACKING_URI` names."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent
    return repository_root() / "mlruns"


def tracking_uri() -> str:
    """The user's `MLFLOW_TRACKING_URI` if set, else the sqlite store inside `mlruns/`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir() / 'mlflow.db'}"


def configure(experiment: str) -> str:
    """Point MLflow at the store and make `experiment` current; returns its id.

    With a sqlite store, artifacts go beside the database (MLflow would otherwise put them in
    `./mlartifacts` of whatever directory the stage runs in). Two queued experiments may start at
    once on a fresh store: the lock keeps them from both migrating the schema or creating the
    experiment.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = uri.startswith("sqlite:///")
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if local:
        store_dir().mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(store_dir() / ".init.lock"))
    with lock:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            try:
                location = store_dir().as_uri() if local else None
                experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # a remote server's experiment, created meanwhile by another client
                experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def standard_tags(stage: str, strategy: str | None = None, **extra: str) -> dict[str, str]:
    tags = {"stage": stage, "git_commit": git_commit(), "device": device_label()}
    if strategy:
        tags["strategy"] = strategy
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # torchrun and `dvc queue kill` stop workers with SIGTERM; turning it into an exception lets the
    # run context below record FAILED instead of leaving the run RUNNING forever.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    stage: str,
    *,
    strategy: str | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    keep_status_on_error: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or reopen, with `run_id`) a run carrying the standard tags; FAILED if the body raises.

    `keep_status_on_error`: a later stage writing into a finished run (evaluate into its training's
    run) must not turn a good training into a FAILED one when the later stage fails.
    """
    configure(experiment)
    status_on_error = "FAILED"
    if run_id is not None and keep_status_on_error:
        status_on_error = mlflow.get_run(run_id).info.status
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    run = mlflow.start_run(run_id=run_id, run_name=run_name)
    try:
        new_tags = standard_tags(stage, strategy, **(tags or {}))
        if run_id is not None:
            # A reopened run (evaluate writing into its training's run, a resumed training)
            # keeps the stage and commit it was created with; the later stage adds its own tags.
            del new_tags["stage"], new_tags["git_commit"]
        mlflow.set_tags(new_tags)
        if params:
            mlflow.log_params(dict(params))
        yield run
    except BaseException:
        mlflow.end_run(status=status_on_error)
        raise
    else:
        mlflow.end_run(status="FINISHED")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


