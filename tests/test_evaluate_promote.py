"""Stages `evaluate` and `promote`: scikit-learn's numbers, written where DVC and MLflow expect them,
and a registry whose aliases move only when a candidate really wins, and never on a rerun.

One tiny model is trained once for the module (`trained`); a second training run for `ddp` logs the
same weights as its own model, so promotion has two runs to choose between. Promotion tests then
edit the eval JSON files and use a registered-model name of their own, so they do not see each
other's versions.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    top_k_accuracy_score,
)
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.evaluate import METRIC_NAMES, classification_metrics, load_trained, run_evaluate
from pipeline.paths import workspace_paths
from pipeline.promote import pick_candidate, run_promote
from pipeline.serving.networks import class_probabilities
from pipeline.serving.precision import native_bf16
from pipeline.shards import load_split, read_manifest

from conftest import REPO, split_files, write_params

EVAL_KEYS = [f"{prefix}{name}" for prefix in ("val_", "test_", "external_") for name in METRIC_NAMES] + [
    "eval_seconds"
]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A workspace with models/dp (trained), models/ddp (the same weights logged by a second
    training run) and both evaluated; its own MLflow store. Yields the workspace (the cwd)."""
    from pipeline.fileio import atomic_write_json
    from pipeline.serving.pyfunc import log_pyfunc_model
    from pipeline.tracking import tracked_run
    from pipeline.train import run_train

    workspace = tmp_path_factory.mktemp("eval-promote") / "ws"
    shutil.copytree(tiny_data / "data", workspace / "data")
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    write_params(workspace, {})
    (workspace / "mlruns").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}")
        patch.delenv("DVC_ROOT", raising=False)
        patch.chdir(workspace)
        params, paths = load_params("params.yaml"), workspace_paths()
        assert run_train(params, paths, "dp", Path("params.yaml")) == 0
        ddp_dir = paths.model_dir("ddp")
        shutil.copytree(paths.model_dir("dp"), ddp_dir)
        (ddp_dir / "run.json").unlink()
        with tracked_run(params.mlflow.experiment, "train", strategy="ddp", tags={"world_size": "2"}) as run:
            info = log_pyfunc_model(ddp_dir)
            atomic_write_json(
                ddp_dir / "run.json",
                {
                    "run_id": run.info.run_id,
                    "experiment_id": run.info.experiment_id,
                    "model_uri": info.model_uri,
                },
            )
        for strategy in ("dp", "ddp"):
            run_evaluate(params, paths, strategy)
        shutil.copy(paths.eval_metrics("dp"), workspace / "eval_template.json")  # for set_eval
        yield workspace


@pytest.fixture
def ws(trained):
    """The module's workspace, with params.yaml and metrics/ put back after each test."""
    saved = {p: p.read_bytes() for p in (trained / "metrics").glob("eval_*.json")}
    yield trained
    for path, data in saved.items():
        path.write_bytes(data)
    (trained / "metrics" / "promotion.json").unlink(missing_ok=True)
    (trained / "metrics" / "promote.json").unlink(missing_ok=True)
    write_params(trained, {})


def set_eval(workspace: Path, strategy: str, value: float | None, metric: str = "val_macro_f1") -> None:
    """Pretend `strategy` scored `value` (None: it has not been evaluated at all)."""
    path = workspace / "metrics" / f"eval_{strategy}.json"
    if value is None:
        path.unlink(missing_ok=True)
        return
    figures = json.loads((path if path.is_file() else workspace / "eval_template.json").read_text())
    figures[metric] = value
    path.write_text(json.dumps(figures))


def promote(workspace: Path, model: str, **promote_params) -> dict:
    write_params(workspace, {"mlflow": {"registered_model": model}, "promote": promote_params})
    return run_promote(load_params("params.yaml"), workspace_paths())


def run_id(workspace: Path, strategy: str) -> str:
    return json.loads((workspace / "models" / strategy / "run.json").read_text())["run_id"]


def registry_state(model: str) -> tuple[list[tuple[int, str | None]], dict[str, int]]:
    client = MlflowClient()
    versions = sorted((int(v.version), v.run_id) for v in client.search_model_versions(f"name='{model}'"))
    aliases = {alias: int(version) for alias, version in client.get_registered_model(model).aliases.items()}
    return versions, aliases


# --- classification_metrics ------------------------------------------------------------------------


def _one_hot_probabilities(y_pred, n_classes=29, second=None):
    probabilities = np.full((len(y_pred), n_classes), 0.01)
    probabilities[np.arange(len(y_pred)), y_pred] = 0.6
    if second is not None:
        probabilities[np.arange(len(y_pred)), second] = 0.3
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def test_classification_metrics_hand_checkable():
    y_true = np.array([0, 1, 2, 3])
    y_pred = np.array([0, 1, 2, 0])  # 3 of 4 right; class 3 taken for class 0
    probabilities = _one_hot_probabilities(
        y_pred, second=np.array([1, 0, 0, 3])
    )  # the miss has the truth second
    figures = classification_metrics(y_true, y_pred, probabilities, "val_")
    assert list(figures) == [f"val_{name}" for name in METRIC_NAMES]
    assert figures["val_accuracy"] == 0.75
    assert figures["val_images"] == 4 and isinstance(figures["val_images"], int)
    assert figures["val_top3_accuracy"] == 1.0
    assert figures["val_balanced_accuracy"] == 0.75  # recalls 1, 1, 1, 0
    assert figures["val_macro_recall"] == 0.75
    assert figures["val_macro_precision"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert figures["val_macro_f1"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)


def test_classification_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 29, 300)
    y_true[:28] = np.arange(28)  # every class but `space`... then some noise
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 29, 300))
    logits = rng.normal(size=(300, 29))
    logits[np.arange(300), y_pred] += 4
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    figures = classification_metrics(y_true, y_pred, probabilities, "test_")
    expected = {
        "test_accuracy": accuracy_score(y_true, y_pred),
        "test_balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "test_top3_accuracy": top_k_accuracy_score(y_true, probabilities, k=3, labels=range(29)),
        "test_images": 300,
    }
    for average in ("macro", "weighted"):
        for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            expected[f"test_{average}_{name}"] = fn(y_true, y_pred, average=average, zero_division=0)
    assert figures == pytest.approx(expected, abs=1e-12)
    assert set(figures) == set(expected)


def test_classification_metrics_ignore_a_class_nobody_has():
    """The test folder has no `del`: a class absent from both truth and prediction must not count as 0."""
    y_true = np.arange(28)  # classes 0-27, one each; 28 never appears
    figures = classification_metrics(y_true, y_true, _one_hot_probabilities(y_true), "test_")
    assert (
        figures["test_macro_f1"] == 1.0
        and figures["test_macro_recall"] == 1.0
        and figures["test_accuracy"] == 1.0
    )


# --- evaluate --------------------------------------------------------------------------------------


def test_evaluate_writes_metrics_and_logs_into_the_training_run(ws):
    manifest = read_manifest(ws / "data" / "shards")
    figures = json.loads((ws / "metrics" / "eval_dp.json").read_text())
    assert list(figures) == EVAL_KEYS
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values())
    assert figures["val_images"] == manifest["splits"]["val"]["count"]  # every image once, no padding
    assert figures["test_images"] == manifest["splits"]["test"]["count"] == 28
    assert 0 <= figures["val_accuracy"] <= figures["val_top3_accuracy"] <= 1

    with open(ws / "metrics" / "predictions_dp.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == figures["val_images"]
    assert set(rows[0]) == {"actual", "predicted"}
    classes = set(manifest["classes"])
    assert all(r["actual"] in classes and r["predicted"] in classes for r in rows)
    assert sum(r["actual"] == r["predicted"] for r in rows) / len(rows) == pytest.approx(
        figures["val_accuracy"]
    )
    assert (ws / "metrics" / "confusion_dp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient()
    run = client.get_run(run_id(ws, "dp"))
    assert run.data.tags["evaluated"] == "true"
    assert run.data.tags["eval_precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert run.data.tags["stage"] == "train"  # the training's run, reopened: its stage tag stays
    for key in (
        "val_macro_f1",
        "val_accuracy",
        "val_top3_accuracy",
        "test_accuracy",
        "external_accuracy",
        "external_macro_f1",
        "eval_seconds",
    ):
        assert run.data.metrics[key] == pytest.approx(figures[key]), key
    assert "train_seconds" in run.data.metrics  # one row: training timings and quality together
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "confusion_dp.png",
        "classification_report.txt",
        "eval_dp.json",
        "confusion_external_dp.png",
        "predictions_external_dp.csv",
    } <= artifacts
    report = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="classification_report.txt")
    ).read_text()
    assert "macro avg" in report and "space" in report and "too few" in report
    assert f"external test set (other signers): {figures['external_images']} images" in report
    assert figures["external_images"] == manifest["splits"]["external"]["count"] == 29 * 2
    assert (ws / "metrics" / "confusion_external_dp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_and_evaluation_record_their_data_as_mlflow_datasets(ws):
    from pipeline.lineage import split_fingerprint

    manifest = read_manifest(ws / "data" / "shards")
    run = MlflowClient().get_run(run_id(ws, "dp"))
    assert run.inputs is not None
    contexts = {}
    for given in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in given.tags}
        contexts[tags["mlflow.data.context"]] = given.dataset.digest
        assert json.loads(given.dataset.source) == {"uri": "data/shards"}
    assert contexts == {
        context: split_fingerprint(manifest, split)
        for split, context in (
            ("train", "training"),
            ("val", "validation"),
            ("test", "test"),
            ("external", "external_test"),
        )
    }


def test_missing_run_json_is_one_line(tiny_workspace):
    params, paths = load_params("params.yaml"), workspace_paths()
    with pytest.raises(UserError, match=r"dvc repro train@dp"):
        run_evaluate(params, paths, "dp")
    paths.model_dir("ddp").mkdir(parents=True)  # a model folder without run.json
    with pytest.raises(UserError, match=r"run\.json is missing: run `dvc repro train@ddp` first"):
        run_evaluate(params, paths, "ddp")

    result = CliRunner().invoke(app, ["evaluate", "ddp"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "dvc repro train@ddp" in result.stderr
    result = CliRunner().invoke(app, ["promote"])
    assert result.exit_code == 2 and "evaluate@dp" in result.stderr and result.stderr.strip().count("\n") == 0


def test_without_an_external_test_set_evaluate_still_writes_every_declared_output(tiny_workspace):
    """data.external_test: null: no external figures to report, yet DVC's declared plots exist."""
    from pipeline.preprocess import build_shards
    from pipeline.train import run_train

    params = load_params(write_params(tiny_workspace, {"data": {"external_test": None}}))
    paths = workspace_paths()
    shutil.rmtree(paths.shards)
    build_shards(params.data, params.seed, paths.raw, paths.raw_train, paths.raw_test, paths.shards)
    assert run_train(params, paths, "dp", Path("params.yaml")) == 0
    figures = run_evaluate(params, paths, "dp")
    assert figures["external_images"] == 0 and figures["val_images"] > 0
    assert paths.external_confusion_png("dp").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths.external_predictions("dp").read_text() == "actual,predicted\n"


# --- promote ---------------------------------------------------------------------------------------


def test_pick_candidate_tie_goes_to_dp():
    assert pick_candidate({"dp": 0.5, "ddp": 0.5}) == "dp"
    assert pick_candidate({"ddp": 0.5, "dp": 0.5}) == "dp"
    assert pick_candidate({"dp": 0.4, "ddp": 0.5}) == "ddp"
    assert pick_candidate({"ddp": 0.1}) == "ddp"


@pytest.mark.parametrize(
    ("candidate", "min_improvement", "passes"),
    [
        ({"val_macro_f1": 0.70, "external_macro_f1": 0.5}, 0.0, False),  # a tie is no improvement
        (
            {"val_macro_f1": 0.75, "external_macro_f1": 0.5},
            0.05,
            True,
        ),  # exactly min_improvement (0.7 + 0.05 in floats)
        ({"val_macro_f1": 0.74, "external_macro_f1": 0.5}, 0.05, False),
        (
            {"val_macro_f1": 0.90, "external_macro_f1": 0.49},
            0.0,
            False,
        ),  # better here, worse on other signers
    ],
)
def test_mlflow_validation_is_the_gate(candidate, min_improvement, passes):
    from pipeline.gate import validate

    champion = {"val_macro_f1": 0.70, "external_macro_f1": 0.5}
    failure = validate(candidate, champion, "val_macro_f1", "external_macro_f1", min_improvement)
    assert (failure is None) == passes, failure
    if not passes:
        assert failure is not None and "failed" in failure  # MLflow's own words for what failed


def test_first_model_becomes_champion_and_a_rerun_changes_nothing(ws):
    set_eval(ws, "ddp", None)
    set_eval(ws, "dp", 0.5)
    record = promote(ws, "first")
    assert record["decision"] == "first_champion" and record["promoted"] == 1
    assert record["candidate_value"] == 0.5 and record["champion_value"] is None and record["version"] == 1
    versions, aliases = registry_state("first")
    assert versions == [(1, run_id(ws, "dp"))]
    assert aliases == {"candidate": 1, "champion": 1}
    tags = MlflowClient().get_model_version("first", "1").tags
    assert (
        tags["strategy"] == "dp" and tags["world_size"] == "1" and tags["source_run_id"] == run_id(ws, "dp")
    )
    assert float(tags["val_macro_f1"]) == 0.5 and "git_commit" in tags
    assert tags["promotion_decision"] == "first_champion" and tags["promotion_reason"]
    manifest = read_manifest(ws / "data" / "shards")
    from pipeline.lineage import split_fingerprint

    # What the figures were measured on, so that a later candidate knows whether they compare.
    assert tags["data_fingerprint.val"] == split_fingerprint(manifest, "val")
    assert tags["data_fingerprint.external"] == split_fingerprint(manifest, "external")
    assert (
        float(tags["external_macro_f1"])
        == json.loads((ws / "metrics" / "eval_dp.json").read_text())["external_macro_f1"]
    )

    # The numbers alone are the stage's metrics file: no text columns in `dvc metrics show`.
    figures = json.loads((ws / "metrics" / "promote.json").read_text())
    assert figures == {"promoted": 1, "version": 1, "champion_version": 1, "improvement": None}

    written = (ws / "metrics" / "promotion.json").read_bytes()
    (ws / "metrics" / "promote.json").unlink()
    promote(ws, "first")
    assert (ws / "metrics" / "promotion.json").read_bytes() == written
    assert json.loads((ws / "metrics" / "promote.json").read_text()) == figures
    assert registry_state("first") == (versions, aliases)

    promote_runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'promote'")
    # The rerun touched nothing at all: not even a second promote run in MLflow.
    assert len(promote_runs) == 1 and list(promote_runs["tags.promotion_decision"]) == ["first_champion"]


def test_better_candidate_takes_the_champion_alias(ws):
    set_eval(ws, "ddp", None)
    set_eval(ws, "dp", 0.5)
    promote(ws, "better")
    set_eval(ws, "ddp", 0.7)
    record = promote(ws, "better")
    assert record["decision"] == "promoted" and record["promoted"] == 1
    assert (
        record["candidate_strategy"] == "ddp"
        and record["candidate_value"] == 0.7
        and record["champion_value"] == 0.5
    )
    assert record["previous_champion_version"] == 1 and record["champion_version"] == record["version"] == 2
    versions, aliases = registry_state("better")
    assert versions == [(1, run_id(ws, "dp")), (2, run_id(ws, "ddp"))]
    assert aliases == {"candidate": 2, "champion": 2}
    assert MlflowClient().get_model_version("better", "2").tags["promotion_decision"] == "promoted"

    written = (ws / "metrics" / "promotion.json").read_bytes()
    promote(ws, "better")  # the same inputs again: the same decision, nothing moves
    assert (ws / "metrics" / "promotion.json").read_bytes() == written
    assert registry_state("better") == (versions, aliases)


@pytest.mark.parametrize(
    ("value", "min_improvement", "decision"),
    [
        (0.70, 0.0, "kept_champion"),  # equal
        (0.60, 0.0, "kept_champion"),  # worse
        (0.72, 0.05, "kept_champion"),  # better, by less than min_improvement
        (
            0.75,
            0.05,
            "promoted",
        ),  # better by exactly min_improvement (0.70 + 0.05 in floats is 0.7500000000000001)
        (0.71, 0.0, "promoted"),
    ],
)
def test_champion_moves_only_for_a_real_improvement(ws, value, min_improvement, decision):
    model = f"cmp-{value}-{min_improvement}"
    set_eval(ws, "dp", None)
    set_eval(ws, "ddp", 0.70)
    assert promote(ws, model)["decision"] == "first_champion"  # ddp's run: version 1, champion at 0.70
    set_eval(ws, "ddp", None)
    set_eval(ws, "dp", value)
    record = promote(ws, model, min_improvement=min_improvement)
    assert record["decision"] == decision
    assert record["candidate_strategy"] == "dp" and record["version"] == 2
    assert record["champion_value"] == 0.70 and record["min_improvement"] == min_improvement
    _, aliases = registry_state(model)
    assert aliases == {"candidate": 2, "champion": 2 if decision == "promoted" else 1}
    assert record["promoted"] == int(decision == "promoted")
    assert MlflowClient().get_model_version(model, "2").tags["promotion_decision"] == decision

    written = (ws / "metrics" / "promotion.json").read_bytes()
    state = registry_state(model)
    promote(ws, model, min_improvement=min_improvement)
    assert (ws / "metrics" / "promotion.json").read_bytes() == written
    assert registry_state(model) == state


def test_champion_alias_serves_the_evaluated_predictions_from_raw_pixels(ws):
    record = promote(ws, "asl-classifier")
    strategy = record["candidate_strategy"]
    model = mlflow.pyfunc.load_model("models:/asl-classifier@champion")

    manifest = read_manifest(ws / "data" / "shards")
    files = split_files(manifest, "val")
    pixels = [np.asarray(Image.open(ws / "data" / "raw" / name).convert("RGB")) for name in files]
    served = model.predict(pd.DataFrame({"pixels": pixels}))
    with open(ws / "metrics" / f"predictions_{strategy}.csv", newline="") as handle:
        evaluated = [row["predicted"] for row in csv.DictReader(handle)]
    assert len(served) == len(evaluated) == len(files)

    # The evaluate stage's probabilities over the shards, for the near-ties the shards' float16
    # cannot resolve: an untrained-ish tiny model has some, and there either answer is right.
    network, config = load_trained(ws / "models" / strategy, strategy)
    images, _ = load_split(ws / "data" / "shards", "val", manifest)
    reference = class_probabilities(network, images, 64, torch.device("cpu"))
    np.testing.assert_allclose(np.stack(served["probabilities"].to_numpy()), reference, atol=2e-3)
    classes = config["classes"]
    for row, (label, expected) in enumerate(zip(served["label"], evaluated, strict=True)):
        if label != expected:
            gap = reference[row, classes.index(expected)] - reference[row, classes.index(label)]
            assert abs(gap) < 2e-3, f"row {row}: served {label}, evaluated {expected} (gap {gap})"


def test_promote_metric_may_be_an_external_figure(ws):
    """Deciding on other signers' images: the champion is measured on the candidate's external set."""
    set_eval(ws, "ddp", None)
    set_eval(ws, "dp", 0.5, metric="external_macro_f1")
    assert promote(ws, "by-external", metric="external_macro_f1")["decision"] == "first_champion"
    set_eval(ws, "dp", None)
    set_eval(ws, "ddp", 0.7, metric="external_macro_f1")
    record = promote(ws, "by-external", metric="external_macro_f1")
    assert record["decision"] == "promoted" and record["decided_on"] == "external_macro_f1"
    assert record["champion_value"] == 0.5 and record["external_metric"] is None, "deciding already: no guard"
    assert set(record["compared_on"]) == {"external"}

    figures = json.loads((ws / "metrics" / "eval_ddp.json").read_text())
    figures = {k: v for k, v in figures.items() if not k.startswith("external_")} | {"external_images": 0}
    (ws / "metrics" / "eval_ddp.json").write_text(json.dumps(figures))
    with pytest.raises(UserError, match="needs an external test set.*data.external_test"):
        promote(ws, "by-external", metric="external_macro_f1")
