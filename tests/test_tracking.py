"""MLflow plumbing: readable run names, the process that holds a run open, closing the runs that dead
processes left RUNNING (and never a live one's), system metrics, and a tracking server that stops
answering ending a command with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.abandoned_runs import ABANDONED_TAG, close_abandoned_runs, owner_tags
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.paths import Paths
from pipeline.tracking import configure, tracked_run, unreachable

from conftest import REPO, write_params

EXPERIMENT = "asl-alphabet"


def test_runs_have_readable_names(mlflow_store, monkeypatch):
    with tracked_run(EXPERIMENT, "fetch") as run:
        pass
    assert MlflowClient().get_run(run.info.run_id).info.run_name == "fetch"
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep")
    with tracked_run(EXPERIMENT, "preprocess") as run:
        pass
    assert MlflowClient().get_run(run.info.run_id).info.run_name == "preprocess-lr-sweep"


def test_a_run_names_the_process_holding_it_open(mlflow_store):
    with tracked_run(EXPERIMENT, "fetch") as run:
        tags = MlflowClient().get_run(run.info.run_id).data.tags
    me = psutil.Process()
    assert (tags["host"], tags["pid"], tags["status_if_abandoned"]) == (
        socket.gethostname(),
        str(me.pid),
        "FAILED",
    )
    assert float(tags["pid_started"]) == pytest.approx(me.create_time(), abs=0.01)


def _gone_process() -> psutil.Process:
    """A process that has exited, with the identity it had (pid, start time) still known."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    identity = psutil.Process(child.pid)
    identity.create_time()  # cached by psutil while the process lives
    child.wait()
    return identity


def _open_run(client: MlflowClient, experiment_id: str, **tags: str) -> str:
    run = client.create_run(experiment_id, tags={"stage": "train", **tags})
    return run.info.run_id


def test_only_runs_whose_process_is_gone_are_closed(mlflow_store):
    experiment_id = configure(EXPERIMENT)
    client = MlflowClient()
    gone = _gone_process()
    host = socket.gethostname()
    mine = owner_tags("FAILED")
    dead = {**mine, "pid": str(gone.pid), "pid_started": f"{gone.create_time():.2f}"}
    runs = {
        "dead": _open_run(client, experiment_id, **dead),
        "dead_reopened_finished": _open_run(
            client, experiment_id, **{**dead, "status_if_abandoned": "FINISHED"}
        ),
        "pid_reused": _open_run(
            client, experiment_id, **{**mine, "pid_started": f"{psutil.Process().create_time() - 3600:.2f}"}
        ),
        "alive": _open_run(client, experiment_id, **mine),  # a queued experiment training beside us
        "other_host": _open_run(client, experiment_id, **{**dead, "host": host + "-elsewhere"}),
        "other_namespace": _open_run(client, experiment_id, **{**dead, "pid_namespace": "pid:[1]"}),
        "untagged": _open_run(client, experiment_id),
    }
    closed = close_abandoned_runs(client, experiment_id, "fetch")
    assert sorted(closed) == sorted(runs[k] for k in ("dead", "dead_reopened_finished", "pid_reused"))
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {
        "dead": "FAILED", "dead_reopened_finished": "FINISHED", "pid_reused": "FAILED",
        "alive": "RUNNING", "other_host": "RUNNING", "other_namespace": "RUNNING", "untagged": "RUNNING",
    }  # fmt: skip
    note = client.get_run(runs["dead"]).data.tags[ABANDONED_TAG]
    assert f"process {gone.pid} on {host}" in note and "`fetch`" in note
    assert ABANDONED_TAG not in client.get_run(runs["alive"]).data.tags


def test_a_new_stage_run_closes_the_abandoned_runs(mlflow_store):
    """What happens after a stage was killed (or lost the server): its next run cleans up."""
    experiment_id = configure(EXPERIMENT)
    client = MlflowClient()
    gone = _gone_process()
    left = _open_run(
        client,
        experiment_id,
        **{**owner_tags("FAILED"), "pid": str(gone.pid), "pid_started": f"{gone.create_time():.2f}"},
    )
    with tracked_run(EXPERIMENT, "train", strategy="dp"):
        assert client.get_run(left).info.status == "FAILED"


def test_a_stage_reopening_a_finished_run_would_leave_it_finished(mlflow_store):
    with tracked_run(EXPERIMENT, "train", strategy="dp") as training:
        pass
    with tracked_run(EXPERIMENT, "evaluate", run_id=training.info.run_id, keep_status_on_error=True):
        tags = MlflowClient().get_run(training.info.run_id).data.tags
        assert tags["status_if_abandoned"] == "FINISHED" and tags["pid"] == str(os.getpid())
        assert tags["stage"] == "train"


def test_a_lost_server_inside_a_stage_is_one_line_naming_the_run(mlflow_store):
    lost = mlflow.exceptions.MlflowException(
        "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=1): "
        "Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch "
        "(Caused by NewConnectionError('Failed to establish a new connection: "
        "[Errno 111] Connection refused'))"
    )
    assert unreachable(lost) and not unreachable(
        mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")
    )
    with pytest.raises(UserError) as caught, tracked_run(EXPERIMENT, "train", strategy="dp") as run:
        raise lost
    message = str(caught.value)
    assert (
        "\n" not in message
        and "stopped answering (connection refused" in message
        and run.info.run_id in message
    )
    assert "MLFLOW_TRACKING_URI" in message
    # Here the store still answers, so the one quick try closes the run.
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_commands_facing_a_dead_server_say_so_in_one_line(tiny_workspace):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_REGISTRY_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    image = next((tiny_workspace / "data" / "raw").rglob("*.jpg"))
    for command in (["fetch"], ["predict", str(image)]):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", *command],
            cwd=tiny_workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(
            f"error: the MLflow tracking server {url} stopped answering (connection refused; 0 retries)"
        ), line
        assert time.monotonic() - started < 60


def _trained_system_metrics(workspace, enabled: bool) -> set[str]:
    from pipeline.train import run_train

    params_file = write_params(
        workspace, {"mlflow": {"system_metrics": enabled}, "gpus": 1, "train": {"epochs": 3}}
    )
    assert run_train(load_params(params_file), Paths(workspace), "dp", params_file) == 0
    run_id = json.loads((Paths(workspace).model_dir("dp") / "run.json").read_text())["run_id"]
    return {name for name in MlflowClient().get_run(run_id).data.metrics if name.startswith("system/")}


def test_training_records_system_metrics_unless_switched_off(tiny_workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    recorded = _trained_system_metrics(tiny_workspace, enabled=True)
    assert {
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage",
    } <= recorded
    assert _trained_system_metrics(tiny_workspace, enabled=False) == set()
