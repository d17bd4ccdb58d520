"""MLflow plumbing every stage shares: the store, the experiment, and runs with the house tags.

The store is `sqlite:///<repository>/mlruns/mlflow.db` unless `MLFLOW_TRACKING_URI` names another
(a team's `mlflow server` takes the same calls). A run ends FAILED, never RUNNING, when its stage
raises or is stopped; a server that stops answering ends the stage with one line naming it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.devices import device_label
from pipeline.errors import UserError
from pipeline.paths import repository_root

# MLflow phones home by default; these machines have no internet and runs must not wait on it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow  # noqa: E402  (after the telemetry switch)
from filelock import FileLock  # noqa: E402
from mlflow.entities import RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.abandoned_runs import close_abandoned_runs, owner_tags  # noqa: E402


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
            except MlflowException as err:
                if unreachable(err):
                    raise
                # A remote server's experiment, created meanwhile by another client.
                created = mlflow.get_experiment_by_name(experiment)
                if created is None:
                    raise
                experiment_id = created.experiment_id
        else:
            experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
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


def default_run_name(stage: str) -> str:
    """`fetch`, `preprocess`, ...; a DVC experiment's runs add its name (`fetch-exp-1a2b3`)."""
    return f"{stage}-{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else stage


# --- a tracking server that stops answering ----------------------------------------------------------

# MLflow's REST client wraps every transport failure (refused, reset, timed out, retries used up on
# 5xx answers) into an MlflowException with this message and no error code of its own.
_TRANSPORT_FAILURE = re.compile(r"API request to \S+ failed with (timeout )?exception")
_REASONS = re.compile(
    r"Connection refused|Connection reset by peer|Name or service not known|"
    r"Temporary failure in name resolution|No route to host|Remote end closed connection without response|"
    r"timed out|too many \d+ error responses"
)


def unreachable(err: BaseException) -> bool:
    """Whether `err` (or what it was raised from) says the tracking server was unreachable or kept failing."""
    import requests

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(
            cause,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.RetryError,
            ),
        ):
            return True
        if isinstance(cause, MlflowException) and _TRANSPORT_FAILURE.match(cause.message):
            return True
        cause = cause.__cause__
    return False


def unreachable_error(err: BaseException, run: mlflow.ActiveRun | None = None) -> UserError:
    """One line: which server, what went wrong, what to do (and which run stays open)."""
    found = _REASONS.search(str(err))
    reason = found.group(0).lower() if found else str(err).strip().splitlines()[0][-160:]
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    left_open = (
        f"; run {run.info.run_id} stays RUNNING until the next stage run on this machine marks it FAILED"
        if run is not None
        else ""
    )
    return UserError(
        f"the MLflow tracking server {mlflow.get_tracking_uri()} stopped answering "
        f"({reason}; {retries} retries){left_open}: "
        "start it again (`python -m pipeline team-server`, or ask whoever runs it) "
        "or point MLFLOW_TRACKING_URI at one that answers, then run the stage again"
    )


@contextlib.contextmanager
def _one_quick_try() -> Iterator[None]:
    """MLflow's HTTP calls without retries and with a short timeout: once the client has spent its
    retries (about 4 minutes by default) on a dead server, closing the run must not spend them again."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- runs ------------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # torchrun and `dvc queue kill` stop workers with SIGTERM; turning it into an exception lets the
    # run context below record FAILED instead of leaving the run RUNNING forever.
    raise SystemExit(128 + signum)


def _start_system_metrics(run_id: str, resumed: bool) -> Any:
    """MLflow's sampler of CPU, memory, disk, network and (with nvidia-ml-py and a GPU) per-GPU
    utilization and memory, logged as `system/...` every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    seconds (10). Started here rather than by `start_run`, so that a dead server cannot hold the
    stage in `end_run` while the sampler's own request retries."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed)
    except Exception as err:  # noqa: BLE001 -- metrics about the machine must never stop a training
        print(f"warning: no system metrics for this run: {err}", file=sys.stderr)
        return None
    monitor.start()
    return monitor


def _stop_system_metrics(monitor: Any, wait: float | None = None) -> None:
    """Stop the sampler (flushing what it holds); with `wait`, give up waiting after that many seconds."""
    if monitor is None:
        return
    if wait is None:
        monitor.finish()
        return
    stopper = threading.Thread(target=monitor.finish, daemon=True, name="stop-system-metrics")
    stopper.start()
    stopper.join(wait)


def _close(run: mlflow.ActiveRun, status: str, monitor: Any, error: BaseException | None) -> None:
    """End the run with `status`; after a lost server, try once and say so in one line."""
    if error is not None and unreachable(error):
        _stop_system_metrics(monitor, wait=2)
        with _one_quick_try(), contextlib.suppress(Exception):
            mlflow.end_run(status=status)  # pops the active run even when the request fails
        raise unreachable_error(error, run) from None
    _stop_system_metrics(monitor)
    try:
        mlflow.end_run(status=status)
    except Exception as end_error:
        if unreachable(end_error):
            raise unreachable_error(end_error, run) from None
        raise


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
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or reopen, with `run_id`) a run carrying the standard tags; FAILED if the body raises.

    `keep_status_on_error`: a later stage writing into a finished run (evaluate into its training's
    run) must not turn a good training into a FAILED one when the later stage fails.
    `system_metrics`: sample the machine's CPU, memory and GPUs into the run while it is open.
    """
    experiment_id = configure(experiment)
    client = MlflowClient()
    status_on_error = "FAILED"
    if run_id is not None and keep_status_on_error:
        status_on_error = client.get_run(run_id).info.status
    new_tags = {**standard_tags(stage, strategy, **(tags or {})), **owner_tags(status_on_error)}
    if run_id is None:
        close_abandoned_runs(client, experiment_id, stage)
    else:
        # A reopened run (evaluate writing into its training's run, a resumed training)
        # keeps the stage and commit it was created with; the later stage adds its own tags.
        del new_tags["stage"], new_tags["git_commit"]
        # Named as this process's before it turns RUNNING: no one may see it open with a dead owner.
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in new_tags.items()])
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        if run_id is None:
            run = mlflow.start_run(run_name=run_name or default_run_name(stage), tags=new_tags)
        else:
            run = mlflow.start_run(run_id=run_id, run_name=run_name)
        monitor = (
            _start_system_metrics(run.info.run_id, resumed=run_id is not None) if system_metrics else None
        )
        try:
            if params:
                mlflow.log_params(dict(params))
            yield run
        except BaseException as err:
            _close(run, status_on_error, monitor, err)
            raise
        else:
            _close(run, "FINISHED", monitor, None)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
