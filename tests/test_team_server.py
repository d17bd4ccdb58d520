"""The pipeline against a team's tracking server, for real: PostgreSQL in a throwaway data directory
(as the `postgres` user when the tests run as root), `mlflow server` on it with proxied artifacts on
a free loopback port (`pipeline.team_server`, what `python -m pipeline team-server` runs), and the
commands users type with `MLFLOW_TRACKING_URI=http://...`: `dvc repro`, two experiments queued with
`dvc queue start -j 2`, `predict`, `serve-ui`, `mlflow models serve`. Every run, metric, artifact,
model version and alias must land on the server, nothing in `mlruns/`. Then the server stops in the
middle of a training.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from test_dvc_pipeline import DVC_TINY, _env, _wait_for_queue, make_project_copy

from pipeline.team_server import postgres_bin, postgres_user, team_server

from serving_support import free_port, start_server, stop, wait_until_up

pytestmark = pytest.mark.slow

EXPERIMENT, MODEL = "asl-alphabet", "asl-classifier"
QUEUED = ("team-a", "team-b")


def _skip_without_postgres() -> None:
    if postgres_bin() is None:
        pytest.skip(
            "PostgreSQL is not installed "
            "(no initdb/pg_ctl in /usr/lib/postgresql/*/bin, $PG_BIN or on PATH): "
            "apt-get install postgresql (.ci/run does)"
        )
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("MLflow's PostgreSQL driver psycopg is not installed: pip install -e '.[test]'")
    try:
        postgres_user()
    except Exception as err:  # noqa: BLE001 -- the reason is the message
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def server():
    _skip_without_postgres()
    # Not under pytest's tmp_path: that is private to the invoking user, and PostgreSQL may run as another.
    folder = Path(tempfile.mkdtemp(prefix="asl-team-server-"))
    folder.chmod(0o711)
    try:
        with team_server(folder, port=free_port()) as running:
            yield running
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def team_env(server, **extra: str) -> dict[str, str]:
    # One-second samples: the tiny trainings last seconds, not the default ten.
    return {
        **_env(),
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        **extra,
    }


def sh(cwd: Path, env: dict[str, str], *command: str, timeout: float = 900) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


def client(server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def runs(server, filter_string: str = "") -> list:
    experiment = client(server).get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return client(server).search_runs(
        [experiment.experiment_id], filter_string=filter_string, max_results=1000
    )


@pytest.fixture(scope="module")
def project(server, tmp_path_factory) -> Path:
    """A tiny project reproduced against the server, then two experiments queued and run at once."""
    project = make_project_copy(tmp_path_factory.mktemp("team-project"), DVC_TINY)
    env = team_env(server)
    sh(project, env, "dvc", "repro")
    for name, override in zip(QUEUED, ("train.lr=0.002", "gpus=1"), strict=True):
        sh(project, env, "dvc", "exp", "run", "--queue", "-S", override, "-n", name)
    sh(project, env, "dvc", "queue", "start", "-j", "2")
    try:
        _wait_for_queue(project, list(QUEUED))
    finally:
        sh(project, env, "dvc", "queue", "stop", "--kill")
    return project


def _nothing_stored_locally(project: Path) -> None:
    assert sorted(p.name for p in (project / "mlruns").iterdir()) == [".gitkeep"], (
        "no stage may write a store of its own"
    )
    assert not list(project.rglob("mlflow.db")) and not list(project.rglob("mlartifacts"))


def test_repro_puts_every_run_metric_artifact_and_alias_on_the_server(server, project):
    repro = [r for r in runs(server) if "dvc_exp_name" not in r.data.tags]
    assert sorted(r.info.run_name for r in repro) == [
        "fetch",
        "preprocess",
        "promote",
        "train-ddp-2gpu",
        "train-dp-2gpu",
    ]
    by_name = {r.info.run_name: r for r in repro}
    assert all(
        r.info.status == "FINISHED" and r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in repro
    )
    store = client(server)
    assert by_name["preprocess"].data.metrics["train_images"] > 0
    assert "manifest.json" in [a.path for a in store.list_artifacts(by_name["preprocess"].info.run_id)]
    for strategy in ("dp", "ddp"):
        run = by_name[f"train-{strategy}-2gpu"]
        assert {
            "val_accuracy",
            "val_macro_f1",
            "train_seconds",
            "system/cpu_utilization_percentage",
            "system/system_memory_usage_megabytes",
        } <= set(run.data.metrics)
        assert run.data.tags["evaluated"] == "true" and run.data.tags["host"] and run.data.tags["pid"]
        logged = {a.path for a in store.list_artifacts(run.info.run_id)}
        assert {
            f"curves_{strategy}.csv",
            f"eval_{strategy}.json",
            f"confusion_{strategy}.png",
            "classification_report.txt",
        } <= logged
        model_uri = json.loads((project / "models" / strategy / "run.json").read_text())["model_uri"]
        model = store.get_logged_model(model_uri.removeprefix("models:/"))
        assert model.source_run_id == run.info.run_id and model.artifact_location.startswith(
            "mlflow-artifacts:/"
        )

    champion = store.get_model_version_by_alias(MODEL, "champion")
    record = json.loads((project / "metrics" / "promotion.json").read_text())
    assert record["decision"] == "first_champion" and int(champion.version) == record["champion_version"] == 1
    assert champion.run_id == record["candidate_run_id"]
    assert json.loads((project / "metrics" / "promote.json").read_text())["version"] == 1
    # The server wrote what the stages uploaded; the stages never wrote there themselves.
    stored = {p.name for p in (server.artifacts).rglob("*") if p.is_file()}
    assert {"manifest.json", "MLmodel", "eval_dp.json", "promotion.json"} <= stored
    _nothing_stored_locally(project)


def test_two_queued_experiments_ran_at_once_against_the_server(server, project):
    store = client(server)
    for name, gpus in zip(QUEUED, ("2", "1"), strict=True):
        trained = runs(server, f"tags.dvc_exp_name = '{name}' and tags.stage = 'train'")
        assert sorted(r.info.run_name for r in trained) == [
            f"train-ddp-{gpus}gpu-{name}",
            f"train-dp-{gpus}gpu-{name}",
        ]
        assert all(r.info.status == "FINISHED" and "val_accuracy" in r.data.metrics for r in trained)
        [promoted] = runs(server, f"tags.dvc_exp_name = '{name}' and tags.stage = 'promote'")
        assert promoted.info.status == "FINISHED" and promoted.info.run_name == f"promote-{name}"
    assert not runs(server, "attributes.status = 'RUNNING'"), "no run may be left open"
    # Both promotions decided against the same registry: the aliases and the recorded decisions agree.
    versions = store.search_model_versions(f"name = '{MODEL}'")
    champion = store.get_model_version_by_alias(MODEL, "champion")
    decided = [json.loads(v.tags["promotion_record"]) for v in versions if "promotion_record" in v.tags]
    assert int(champion.version) in {d["champion_version"] for d in decided}
    assert not list(project.glob(".dvc/tmp/exps/**/mlruns/mlflow.db"))
    _nothing_stored_locally(project)


def test_predict_serve_ui_and_mlflow_models_serve_load_the_champion_from_the_server(
    server, project, tmp_path
):
    env = team_env(server)
    champion = int(client(server).get_model_version_by_alias(MODEL, "champion").version)
    image = project / "data" / "raw" / "asl_alphabet_test" / "asl_alphabet_test" / "A_test.jpg"
    table = sh(project, {**env, "COLUMNS": "160"}, sys.executable, "-m", "pipeline", "predict", str(image))
    assert f"{MODEL} version {champion}" in table

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["serve"]["port"] = port = free_port()
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(params))
    ui = start_server(
        [sys.executable, "-m", "pipeline", "serve-ui", "--params", str(tmp_path / "serve.yaml")],
        tmp_path / "ui.log",
        cwd=project,
        env=env,
    )
    try:
        wait_until_up(ui, f"http://127.0.0.1:{port}/api/health", tmp_path / "ui.log")
        assert (
            requests.get(f"http://127.0.0.1:{port}/api/health", timeout=10).json()["model"]["version"]
            == champion
        )
    finally:
        stop(ui)

    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    served = start_server(command, tmp_path / "serve.log", cwd=tmp_path, env=env)
    try:
        wait_until_up(served, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log")
        import base64

        body: dict[str, Any] = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(image.read_bytes()).decode()]],
            }
        }
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["predictions"][0]["probabilities"]) == 29, (
            answer.text
        )
    finally:
        stop(served)
    _nothing_stored_locally(project)


def test_the_server_stopping_mid_training_ends_the_stage_in_one_line_and_the_run_is_closed_later(
    server, project, tmp_path
):
    """What really happens: MLflow's client retries (here 2 retries, a second apart; by default 7 with
    backoff, about 4 minutes), then the stage ends with one line naming the server, its run still
    RUNNING there. Once the server is back, the next stage run on this machine marks it FAILED."""
    long_run = yaml.safe_load((project / "params.yaml").read_text())
    long_run["train"]["epochs"] = 200
    long_run["gpus"] = 1
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(long_run))
    env = team_env(server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    log = tmp_path / "train.log"
    with log.open("w") as out:
        training = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "train", "dp", "--params", str(tmp_path / "long.yaml")],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (
            open_runs := runs(server, f"attributes.status = 'RUNNING' and tags.pid = '{training.pid}'")
        ):
            assert training.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        [left_open] = open_runs
        server.stop()
        training.wait(timeout=180)
    finally:
        if training.poll() is None:
            training.kill()
    output = log.read_text()
    assert training.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    assert line.startswith(
        f"error: the MLflow tracking server {server.url} stopped answering (connection refused; 2 retries)"
    ), line
    assert f"run {left_open.info.run_id} stays RUNNING" in line

    server.start()
    store = client(server)
    assert store.get_run(left_open.info.run_id).info.status == "RUNNING"
    # A run whose process lives (as a queued experiment's would) must survive the clean-up.
    experiment = store.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    experiment_id = experiment.experiment_id
    from pipeline.abandoned_runs import owner_tags

    alive = store.create_run(experiment_id, tags={"stage": "train", **owner_tags("FAILED")}).info.run_id
    sh(project, team_env(server), sys.executable, "-m", "pipeline", "fetch")
    closed = store.get_run(left_open.info.run_id)
    assert closed.info.status == "FAILED" and "`fetch`" in closed.data.tags["abandoned"]
    assert store.get_run(alive).info.status == "RUNNING"
    store.set_terminated(alive, "KILLED")
