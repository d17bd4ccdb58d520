"""The pipeline driven by DVC for real, in a temporary copy of the project with tiny params.

These are the commands users type: `dvc repro`, `dvc exp run -S gpus=2`, `dvc exp run --queue`
with `dvc queue start`, `dvc exp show`. The MLflow store they write is the copy's own
`mlruns/mlflow.db`, found through `$DVC_ROOT` even for queued experiments, which run in a
further copy under `.dvc/tmp/exps/`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import params_from_dict, to_yaml_dict

from conftest import REPO, TINY_PARAMS, deep_merge

pytestmark = pytest.mark.slow

# One epoch is enough to exercise every stage; the tiny profile keeps each stage to seconds.
DVC_TINY = deep_merge(TINY_PARAMS, {"train": {"epochs": 1}})


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "DVC_"))
    }
    # `dvc queue start` runs `dvc` workers found on PATH: put this environment's first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@localhost")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@localhost")
    return env


def sh(cwd: Path, *command: str, timeout: float = 600) -> str:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def make_project_copy(target: Path, params: dict) -> Path:
    """The project's tracked and untracked-but-not-ignored files, committed into a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, files.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    # Every key written out: DVC refuses a stage whose declared params are missing from the file.
    (target / "params.yaml").write_text(
        yaml.safe_dump(to_yaml_dict(params_from_dict(params)), sort_keys=False)
    )
    sh(target, "git", "init", "-q", "-b", "main")
    sh(target, "git", "add", "-A")
    sh(target, "git", "commit", "-q", "-m", "tiny params")
    return target


def store(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(project: Path, filter_string: str = "") -> list:
    client = store(project)
    experiment = client.get_experiment_by_name("asl-alphabet")
    return (
        client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=1000)
        if experiment
        else []
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project_copy(tmp_path_factory.mktemp("project"), DVC_TINY)


def test_dvc_repro_preprocess_makes_shards_and_mlflow_runs(project):
    sh(project, "dvc", "repro", "preprocess")
    manifest = json.loads((project / "data" / "shards" / "manifest.json").read_text())
    assert manifest["image_size"] == 32 and manifest["splits"]["train"]["count"] > 0
    for shard in manifest["shards"]:
        assert (project / "data" / "shards" / shard["file"]).is_file()
    for stage in ("fetch", "preprocess"):
        [run] = runs_of(project, f"tags.stage = '{stage}'")
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == sh(project, "git", "rev-parse", "HEAD").strip()
        assert run.data.params["data.image_size"] == "32"
    [preprocess] = runs_of(project, "tags.stage = 'preprocess'")
    assert preprocess.data.metrics["train_images"] == manifest["splits"]["train"]["count"]
    assert "manifest.json" in [a.path for a in store(project).list_artifacts(preprocess.info.run_id)]

    # A second repro reuses everything: no stage runs, no file is rewritten, MLflow gets no new run.
    shards = {path: path.stat().st_mtime_ns for path in (project / "data" / "shards").iterdir()}
    runs_before = len(runs_of(project))
    again = sh(project, "dvc", "repro", "preprocess").lower()
    assert "didn't change, skipping" in again and "running stage" not in again, again
    assert {path: path.stat().st_mtime_ns for path in (project / "data" / "shards").iterdir()} == shards
    assert len(runs_of(project)) == runs_before


def test_exp_run_with_gpus_2_trains_both_strategies(project):
    output = sh(project, "dvc", "exp", "run", "-S", "gpus=2", "-n", "two-gpus")
    train_runs = runs_of(project, "tags.stage = 'train' and tags.dvc_exp_name = 'two-gpus'")
    assert sorted(r.data.tags["strategy"] for r in train_runs) == ["ddp", "dp"], output[-2000:]
    for run in train_runs:
        assert run.data.params["gpus"] == "2" and run.info.status == "FINISHED"
        assert "val_macro_f1" in run.data.metrics, "evaluate logs into the training's run"
    ddp = next(r for r in train_runs if r.data.tags["strategy"] == "ddp")
    assert ddp.data.metrics["world_size"] == 2
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    assert "two-gpus" in json.dumps(shown)
    champion = store(project).get_model_version_by_alias("asl-classifier", "champion")
    assert champion.run_id in {r.info.run_id for r in train_runs}


def _wait_for_queue(project: Path, names: list[str], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(project, "dvc", "queue", "status")
        rows = [line for line in status.splitlines() if any(name in line for name in names)]
        if len(rows) == len(names) and all("Success" in row for row in rows):
            return
        assert not any("Failed" in row for row in rows), status + sh(
            project, "dvc", "queue", "logs", names[0]
        )
        time.sleep(3)
    raise AssertionError(f"queue did not finish: {status}")


@pytest.mark.parametrize("workers", [1, 2])
def test_queued_experiments_land_in_the_real_store(project, workers):
    names = [f"q{workers}-gpus{g}" for g in (1, 2)]
    for gpus, name in zip((1, 2), names, strict=True):
        # A learning rate of its own makes each experiment new to DVC, while fetch and preprocess
        # still come from the cache: only the training half of the pipeline runs again.
        sh(
            project,
            "dvc",
            "exp",
            "run",
            "--queue",
            "-S",
            f"gpus={gpus}",
            "-S",
            f"train.lr={0.001 * workers}",
            "-n",
            name,
        )
    sh(project, "dvc", "queue", "start", "-j", str(workers))
    _wait_for_queue(project, names)
    sh(project, "dvc", "queue", "stop", "--kill")
    for gpus, name in zip((1, 2), names, strict=True):
        runs = runs_of(project, f"tags.dvc_exp_name = '{name}' and tags.stage = 'train'")
        assert sorted(r.data.tags["strategy"] for r in runs) == ["ddp", "dp"], name
        assert {r.data.params["gpus"] for r in runs} == {str(gpus)}
        assert all("val_accuracy" in r.data.metrics and r.info.status == "FINISHED" for r in runs)
    assert not list(project.glob(".dvc/tmp/exps/**/mlruns/mlflow.db")), (
        "no experiment may write a store of its own"
    )
    table = sh(project, "dvc", "exp", "show", "--csv")
    assert all(name in table for name in names) and "val_macro_f1" in table


def test_a_dvc_remote_gives_a_fresh_clone_the_results_without_recomputing(project, tmp_path):
    """The README's team round trip: `dvc push` fills the remote, a colleague's `git clone` and
    `dvc pull` get the shards, models and metrics, and `dvc repro` there has nothing to rerun."""
    sh(
        project, "dvc", "repro"
    )  # the workspace's own results (the queue tests left experiments, not the workspace)
    sh(project, "dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"))
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-q", "-m", "results, and the team's remote")
    assert "pushed" in sh(project, "dvc", "push")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "shards").exists() and not (clone / "models").exists()
    sh(clone, "dvc", "pull")
    manifest = json.loads((clone / "data" / "shards" / "manifest.json").read_text())
    assert all((clone / "data" / "shards" / shard["file"]).is_file() for shard in manifest["shards"])
    for strategy in ("dp", "ddp"):
        assert (clone / "models" / strategy / "model.safetensors").is_file()
        for name in (f"train_{strategy}.json", f"eval_{strategy}.json"):
            assert (clone / "metrics" / name).read_bytes() == (project / "metrics" / name).read_bytes()
    assert (clone / "metrics" / "promote.json").is_file() and (clone / "metrics" / "promotion.json").is_file()
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "status")
    rerun = sh(clone, "dvc", "repro")
    assert "Running stage" not in rerun and "Data and pipelines are up to date" in rerun, rerun
    assert not (clone / "mlruns" / "mlflow.db").exists(), "nothing ran, so nothing was logged"
