"""Promotion compares like with like: the champion is measured on the candidate's evaluation data, a
champion that trained on those images is never scored on them, and two promotes at once leave the
registry and their records agreeing.

Three tiny trainings share one MLflow store: `honest` (the block split), `leaky` (a random split of
the same frames) and `resized` (the block split at 40 px instead of 32). Tests promote them under
registered-model names of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import f1_score

from pipeline.aliases import alias_number, apply_aliases
from pipeline.config import load_params
from pipeline.evaluate import run_evaluate
from pipeline.lineage import MANIFEST_ARTIFACT, fingerprint_tag, split_files, split_fingerprint
from pipeline.paths import Paths
from pipeline.preprocess import shard_workspace
from pipeline.promote import _decision, run_promote
from pipeline.shards import read_manifest
from pipeline.train import run_train

from conftest import REPO, write_params

pytestmark = pytest.mark.slow  # three trainings, and a race between two real processes

WORKSPACES: dict[str, dict[str, Any]] = {
    "honest": {},
    "leaky": {"data": {"split": "random"}},
    "resized": {"data": {"image_size": 40}},
}


def _prepare(root: Path, tiny_data: Path, name: str) -> Path:
    """A workspace with the tiny raw data, shards made with its own params, a trained, evaluated dp model."""
    workspace = root / name
    for folder in ("raw", "external"):
        shutil.copytree(tiny_data / "data" / folder, workspace / "data" / folder)
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    write_params(workspace, WORKSPACES[name])
    params, paths = load_params(workspace / "params.yaml"), Paths(workspace)
    shard_workspace(params, paths)
    assert run_train(params, paths, "dp", workspace / "params.yaml") == 0
    run_evaluate(params, paths, "dp")
    return workspace


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("fair")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        patch.delenv("DVC_ROOT", raising=False)
        patch.chdir(root)
        workspaces = {name: _prepare(root, tiny_data, name) for name in WORKSPACES}
        yield workspaces
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]  # None: back to the default


def promote(workspace: Path, model: str, name: str, **overrides) -> dict:
    merged = {**WORKSPACES[name], "mlflow": {"registered_model": model}, "promote": overrides}
    write_params(workspace, merged)
    return run_promote(load_params(workspace / "params.yaml"), Paths(workspace))


def set_figures(workspace: Path, **figures: float) -> dict:
    """Pretend the dp model scored `figures`; returns the file's previous content."""
    path = workspace / "metrics" / "eval_dp.json"
    before = json.loads(path.read_text())
    path.write_text(json.dumps({**before, **figures}))
    return before


def run_of(workspace: Path) -> str:
    return json.loads((workspace / "models" / "dp" / "run.json").read_text())["run_id"]


# --- lineage -----------------------------------------------------------------------------------


def test_runs_record_the_data_they_saw_and_other_data_shows_as_other(store):
    client = MlflowClient()
    digests = {}
    for name, workspace in store.items():
        manifest = read_manifest(workspace / "data" / "shards")
        run = client.get_run(run_of(workspace))
        assert run.inputs is not None, name
        inputs = {i.dataset.name.rsplit("-", 1)[1]: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val", "test", "external"}, name
        for split, given in inputs.items():
            tags = {t.key: t.value for t in given.tags}
            assert given.dataset.digest == split_fingerprint(manifest, split)
            assert (
                json.loads(given.dataset.source) == {"uri": "data/shards"}
                and tags["dvc_path"] == "data/shards"
            )
            assert (
                tags["mlflow.data.context"]
                == {"train": "training", "val": "validation", "test": "test", "external": "external_test"}[
                    split
                ]
            )
            assert int(tags["images"]) == manifest["splits"][split]["count"]
        assert run.data.tags[fingerprint_tag("val")] == split_fingerprint(manifest, "val")
        logged = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=MANIFEST_ARTIFACT)
            ).read_text()
        )
        assert logged == manifest, "the training run keeps the list of files it trained on"
        digests[name] = {split: given.dataset.digest for split, given in inputs.items()}
    assert digests["honest"]["val"] != digests["leaky"]["val"] != digests["resized"]["val"]
    assert digests["honest"]["external"] == digests["leaky"]["external"], (
        "the same external images, prepared alike"
    )


def test_external_figures_are_in_the_metrics_file_and_the_run(store):
    workspace = store["honest"]
    figures = json.loads((workspace / "metrics" / "eval_dp.json").read_text())
    assert figures["external_images"] == 58 and 0 <= figures["external_accuracy"] <= 1
    run = MlflowClient().get_run(run_of(workspace))
    for key in ("external_accuracy", "external_macro_f1", "external_top3_accuracy"):
        assert run.data.metrics[key] == pytest.approx(figures[key])
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_external_dp.png", "predictions_external_dp.csv"} <= artifacts
    report = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/classification_report.json")
    assert set(report) == {"val", "test", "external"} and "macro avg" in report["external"]


# --- the champion on the candidate's data --------------------------------------------------------


def test_a_champion_crowned_on_a_leaky_split_does_not_keep_its_title_by_its_number(store):
    honest, leaky = store["honest"], store["leaky"]
    champion_external = json.loads((leaky / "metrics" / "eval_dp.json").read_text())["external_macro_f1"]
    saved_leaky = set_figures(leaky, val_macro_f1=0.99)  # what a random split reports
    saved_honest = set_figures(honest, val_macro_f1=0.5, external_macro_f1=champion_external + 0.05)
    try:
        assert promote(leaky, "leak", "leaky")["decision"] == "first_champion"
        record = promote(honest, "leak", "honest")
        assert record["decision"] == "promoted" and record["champion_version"] == record["version"] == 2
        assert record["decided_on"] == "external_macro_f1" and record["champion_value"] is None
        assert (
            record["compared_on"]["val"]["compared"] is False
            and "trained on" in record["compared_on"]["val"]["how"]
        )
        assert record["compared_on"]["external"]["how"] == "recorded on the same external data"
        assert record["champion_external_value"] == pytest.approx(champion_external)
        assert alias_number(MlflowClient(), "leak", "champion") == 2

        # Without an external guard there is no fair comparison left: nothing is promoted, and it says so.
        assert promote(leaky, "leak-no-external", "leaky")["decision"] == "first_champion"
        record = promote(honest, "leak-no-external", "honest", external_metric=None)
        assert (
            record["decision"] == "not_compared"
            and record["promoted"] == 0
            and record["champion_version"] == 1
        )
        assert "trained on" in record["reason"] and "by hand" in record["reason"]
        assert alias_number(MlflowClient(), "leak-no-external", "champion") == 1
    finally:
        (leaky / "metrics" / "eval_dp.json").write_text(json.dumps(saved_leaky))
        (honest / "metrics" / "eval_dp.json").write_text(json.dumps(saved_honest))


def test_a_champion_trained_at_another_size_is_scored_on_the_raw_files_through_its_own_preprocessing(store):
    honest, resized = store["honest"], store["resized"]
    assert promote(resized, "sizes", "resized")["decision"] == "first_champion"
    record = promote(honest, "sizes", "honest")
    assert record["decision"] in ("promoted", "kept_champion")
    for split in ("val", "external"):
        assert record["compared_on"][split]["compared"], record["compared_on"]
        assert "raw" in record["compared_on"][split]["how"] and "40 px" in record["compared_on"][split]["how"]

    # The same figure, computed here from the served champion and the candidate's own files.
    model = mlflow.pyfunc.load_model("models:/sizes/1")
    manifest = read_manifest(honest / "data" / "shards")
    for split, root, key in (
        ("val", honest / "data" / "raw", "champion_value"),
        ("external", honest / "data" / "external", "champion_external_value"),
    ):
        files = split_files(manifest, split)
        served = model.predict(pd.DataFrame({"image": [(root / name).read_bytes() for name in files]}))
        truth = [Path(name).parent.name for name in files]
        labels = sorted(set(truth) | set(served["label"]))
        assert record[key] == pytest.approx(
            f1_score(truth, list(served["label"]), labels=labels, average="macro", zero_division=0)
        )
    assert record["validation"] == "passed" or record["decision"] == "kept_champion"


def test_a_champion_recorded_on_other_data_is_scored_again_from_the_shards(store):
    honest = store["honest"]
    real = json.loads((honest / "metrics" / "eval_dp.json").read_text())
    assert promote(honest, "rescored", "honest")["decision"] == "first_champion"
    client = MlflowClient()
    client.set_model_version_tag("rescored", "1", fingerprint_tag("val"), "measured-elsewhere")
    client.set_model_version_tag("rescored", "1", "val_macro_f1", "0.999")  # a number from other data
    _, record = _decide_with(honest, "rescored", store["leaky"] / "models" / "dp")
    assert record["compared_on"]["val"]["how"] == "scored from the val shards"
    assert record["champion_value"] == pytest.approx(real["val_macro_f1"]), (
        "its figure on this data, not 0.999"
    )


def _decide_with(workspace: Path, model: str, other_model_dir: Path):
    """The decision `promote` would make for a second version of `model` (registered from another run)."""
    client = MlflowClient()
    other = json.loads((other_model_dir / "run.json").read_text())
    version = mlflow.register_model(other["model_uri"], model)
    params = load_params(workspace / "params.yaml")
    manifest = read_manifest(workspace / "data" / "shards")
    figures = json.loads((workspace / "metrics" / "eval_dp.json").read_text())
    inputs = {
        "registered_model": model,
        "metric": "val_macro_f1",
        "external_metric": None,
        "min_improvement": 0.0,
        "candidate_strategy": "dp",
        "candidate_run_id": other["run_id"],
        "candidate_value": figures["val_macro_f1"],
        "candidate_external_value": None,
        "version": int(version.version),
        "evaluated": {},
        "data_fingerprints": {},
    }
    version = client.get_model_version(model, version.version)
    record, _ = _decision(
        client, model, inputs, version, manifest, Paths(workspace), params.evaluate.batch_size
    )
    return version, record


def test_aliases_are_not_set_on_a_decision_the_registry_no_longer_matches(store):
    """What holds two promotes apart on a remote tracking server, where no file lock reaches."""
    honest, resized = store["honest"], store["resized"]
    assert promote(honest, "moved", "honest")["decision"] == "first_champion"
    _, record = _decide_with(honest, "moved", resized / "models" / "dp")
    client = MlflowClient()
    third = mlflow.register_model(
        json.loads((store["leaky"] / "models" / "dp" / "run.json").read_text())["model_uri"], "moved"
    )
    client.set_registered_model_alias("moved", "champion", third.version)  # another promote, meanwhile
    assert apply_aliases(client, "moved", record, replayed=False) is False
    assert alias_number(client, "moved", "champion") == int(third.version), "nothing overwritten"
    assert alias_number(client, "moved", "candidate") == 1, (
        "the candidate alias stays where the last decision put it"
    )


# --- two promotes at once ------------------------------------------------------------------------

RACER = """
import sys, time
from pathlib import Path
import mlflow
from pipeline.config import load_params
from pipeline.paths import Paths
from pipeline.promote import run_promote
workspace, start = Path(sys.argv[1]), Path(sys.argv[2])
params = load_params(workspace / "params.yaml")
(workspace / "ready").touch()
while not start.exists():
    time.sleep(0.002)
run_promote(params, Paths(workspace))
"""


def test_two_promotes_at_once_leave_the_registry_and_their_records_agreeing(store, tmp_path):
    """Both candidates beat the champion, which each must score again from the raw files (seconds):
    decided side by side, both would crown themselves, and the last alias written would win."""
    assert promote(store["resized"], "race", "resized")["decision"] == "first_champion"
    racers = {"honest": store["honest"], "leaky": store["leaky"]}
    saved = {
        name: set_figures(w, val_macro_f1=0.9 + 0.05 * i, external_macro_f1=0.9 + 0.05 * i)
        for i, (name, w) in enumerate(racers.items())
    }
    start = tmp_path / "start"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for name, workspace in racers.items():
            write_params(workspace, {**WORKSPACES[name], "mlflow": {"registered_model": "race"}})
            (workspace / "ready").unlink(missing_ok=True)
            (workspace / "metrics" / "promotion.json").unlink(missing_ok=True)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(w), str(start)],
                cwd=w,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for w in racers.values()
        ]
        deadline = time.monotonic() + 120
        while not all(
            (w / "ready").exists() for w in racers.values()
        ):  # both imported everything: start together
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), (
                "a racer did not get ready"
            )
            time.sleep(0.01)
        start.touch()
        for process in processes:
            output = process.communicate(timeout=300)[0].decode()
            assert process.returncode == 0, output[-3000:]
    finally:
        for name, workspace in racers.items():
            (workspace / "metrics" / "eval_dp.json").write_text(json.dumps(saved[name]))

    records = [json.loads((w / "metrics" / "promotion.json").read_text()) for w in racers.values()]
    first, second = sorted(records, key=lambda r: r["previous_champion_version"] != 1)
    assert first["previous_champion_version"] == 1 and first["decision"] == "promoted", first
    # The second decided against the champion the first left behind, not the one both saw at the start.
    assert second["previous_champion_version"] == first["champion_version"] == first["version"], (
        first,
        second,
    )
    client = MlflowClient()
    aliases = {alias: int(v) for alias, v in client.get_registered_model("race").aliases.items()}
    assert aliases["champion"] == second["champion_version"], "the registry says what the last decision says"
    for record in records:
        assert (
            json.loads(client.get_model_version("race", str(record["version"])).tags["promotion_record"])
            == record
        )
