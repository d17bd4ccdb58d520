"""Stage `evaluate@<strategy>`: scikit-learn metrics of a trained model, logged into its training run.

    python -m pipeline evaluate dp

One process scores every validation image exactly once, then the test folder and the external test
set (other signers, `external_*` figures), and writes `metrics/eval_<strategy>.json`, the
predictions for DVC's confusion plots and confusion PNGs.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_bytes, atomic_write_json
from pipeline.lineage import fingerprint_tags, log_splits
from pipeline.paths import Paths
from pipeline.registry import existing_run, read_run_info
from pipeline.serving.networks import class_probabilities
from pipeline.serving.precision import autocast, precision
from pipeline.shards import open_shard, read_manifest, split_shards, verify_shards

TOP_K = 3
METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "top3_accuracy",
    "images",
)
"""Keys of `classification_metrics`, after its prefix (`val_`, `test_`, `external_`)."""

TEST_NOTE = (
    "NOTE: the test folder holds one image per class (28 images, no `del`): far too few to judge a "
    "model by. Read it as a smoke test; the validation figures are the ones to compare."
)


# --- the model folder ------------------------------------------------------------------------------


def load_trained(model_dir: Path, strategy: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network (eval mode, CPU) and its model_config.json, via the serving model's loader."""
    from pipeline.serving.pyfunc import CONFIG_FILE, WEIGHTS_FILE, load_network, read_model_config

    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir / name} is missing: run `dvc repro train@{strategy}` first")
    config = read_model_config(model_dir / CONFIG_FILE)
    return load_network(model_dir / WEIGHTS_FILE, config), config


# --- inference and metrics ---------------------------------------------------------------------


def _present_labels(y_true: np.ndarray, y_pred: np.ndarray) -> list[int]:
    # scikit-learn's own default: the classes that occur in y_true or y_pred. A class absent from
    # both (`del` in the test folder) would otherwise count as a zero and drag every macro average down.
    return sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))


def classification_metrics(y_true, y_pred, probabilities, prefix: str) -> dict[str, float]:
    """scikit-learn's figures for one split, keys `<prefix><name>` for every name in METRIC_NAMES.

    `probabilities` is N x classes (columns in label order), for top-3 accuracy. Precision, recall
    and F1 use zero_division=0 over the classes present in y_true or y_pred.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    y_true, y_pred, probabilities = (
        np.asarray(y_true),
        np.asarray(y_pred),
        np.asarray(probabilities, dtype=np.float64),
    )
    if len(y_true) == 0:
        raise ValueError("classification_metrics needs at least one prediction")
    labels = _present_labels(y_true, y_pred)
    with warnings.catch_warnings():
        # Predicting a class that y_true lacks is normal on a 28-image test folder, not news.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y_true, y_pred)
    figures = {"accuracy": accuracy_score(y_true, y_pred), "balanced_accuracy": balanced}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        figures.update({f"{average}_precision": precision, f"{average}_recall": recall, f"{average}_f1": f1})
    figures["top3_accuracy"] = top_k_accuracy_score(
        y_true, probabilities, k=TOP_K, labels=list(range(probabilities.shape[1]))
    )
    figures["images"] = len(y_true)
    return {
        f"{prefix}{name}": (int(figures[name]) if name == "images" else float(figures[name]))
        for name in METRIC_NAMES
    }


def class_report(y_true, y_pred, classes: list[str]) -> tuple[str, dict]:
    """scikit-learn's per-class report, as text and as a dict, over the classes present."""
    from sklearn.metrics import classification_report

    labels = _present_labels(y_true, y_pred)
    kwargs = dict(labels=labels, target_names=[classes[i] for i in labels], zero_division=0)
    return classification_report(y_true, y_pred, digits=4, **kwargs), classification_report(
        y_true, y_pred, output_dict=True, **kwargs
    )


def confusion_png(y_true, y_pred, classes: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG, class names on both axes, zero cells left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    if len(y_true):
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    else:  # no images (no external test set): an empty plot, which scikit-learn refuses to count
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    side = max(6.0, 0.42 * len(classes) + 2.5)
    figure, axes = plt.subplots(figsize=(side + 1.5, side), dpi=110)
    try:
        display = ConfusionMatrixDisplay(matrix, display_labels=list(classes))
        display.plot(ax=axes, cmap="Blues", xticks_rotation="vertical", values_format="d", colorbar=False)
        figure.colorbar(display.im_, ax=axes, fraction=0.046, pad=0.02)
        for (row, col), text in np.ndenumerate(display.text_):
            text.set_fontsize(7)
            if matrix[row, col] == 0:
                text.set_text("")
        axes.tick_params(labelsize=8)
        axes.set_title(title, fontsize=10)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
        return buffer.getvalue()
    finally:
        plt.close(figure)


def predictions_csv(y_true, y_pred, classes: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(
        (classes[t], classes[p])
        for t, p in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist(), strict=True)
    )
    return buffer.getvalue().encode()


# --- the stage ---------------------------------------------------------------------------------


def _check_compatible(config: dict, manifest: dict, strategy: str) -> None:
    if list(config["classes"]) != list(manifest["classes"]) or int(config["image_size"]) != int(
        manifest["image_size"]
    ):
        raise UserError(
            f"models/{strategy} was trained on other shards (classes or image size differ from data/shards): "
            f"run `dvc repro train@{strategy}` first"
        )


def _evaluate_split(
    network, paths: Paths, manifest: dict, split: str, params: Params, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(labels, predictions, probabilities) of a split, None if it is empty. Shard by shard, each
    memory-mapped only while it is scored: any split size fits in memory."""
    shards = split_shards(manifest, split)
    if not shards:
        return None
    verify_shards(paths.shards, manifest, (split,))
    labels: list[np.ndarray] = []
    per_shard: list[np.ndarray] = []
    # The precision the training validated in: bf16 where asked for and native on the device.
    with autocast(device, precision(device, params.train.bf16)):
        for shard in shards:
            images, shard_labels = open_shard(paths.shards, shard, manifest["image_size"])
            per_shard.append(class_probabilities(network, images, params.evaluate.batch_size, device))
            labels.append(shard_labels.numpy())
            del images
    probabilities = np.concatenate(per_shard)
    return np.concatenate(labels), probabilities.argmax(axis=1), probabilities


def _evaluate_external(
    network, paths: Paths, manifest: dict, params: Params, device: torch.device, strategy: str
) -> tuple[dict, str | None, dict | None]:
    """`external_*` figures, per-class report (text, dict) and confusion plots of the external test set.

    The plot files are written even without an external set, so that DVC finds every declared output."""
    classes = list(manifest["classes"])
    scored = _evaluate_split(network, paths, manifest, "external", params, device)
    if scored is None:
        y_true = y_pred = np.zeros(0, dtype=np.int64)
        metrics: dict[str, float] = {"external_images": 0}
        text, report = None, None
        title = f"{strategy}: no external test set (data.external_test is null)"
    else:
        y_true, y_pred, _ = scored
        metrics = classification_metrics(*scored, prefix="external_")
        text, report = class_report(y_true, y_pred, classes)
        title = (
            f"{strategy}: external test set, {metrics['external_images']} images, accuracy "
            f"{metrics['external_accuracy']:.3f}, macro F1 {metrics['external_macro_f1']:.3f}"
        )
    atomic_write_bytes(paths.external_predictions(strategy), predictions_csv(y_true, y_pred, classes))
    atomic_write_bytes(paths.external_confusion_png(strategy), confusion_png(y_true, y_pred, classes, title))
    return metrics, text, report


def _report_text(strategy: str, run_id: str, val_text: str, test_text: str | None, metrics: dict) -> str:
    parts = [
        f"Evaluation of models/{strategy} (MLflow run {run_id})",
        "",
        f"== validation split: {metrics['val_images']} images ==",
        val_text,
    ]
    if test_text is None:
        parts += ["== test folder: no images ==", ""]
    else:
        parts += [f"== test folder: {metrics['test_images']} images ==", TEST_NOTE, "", test_text]
    return "\n".join(parts)


def _external_report_text(text: str | None, metrics: dict) -> str:
    if text is None:
        return "== external test set: none (data.external_test is null) ==\n"
    return f"== external test set (other signers): {metrics['external_images']} images ==\n{text}"


def _metric_step(client, run_id: str) -> int:
    """The training's last epoch step: logged there (later in time), the eval value is the one the
    MLflow UI shows as the run's `val_accuracy`, while the per-epoch history keeps its shape."""
    history = client.get_metric_history(run_id, "val_accuracy")
    return max((m.step for m in history), default=0)


def run_evaluate(params: Params, paths: Paths, strategy: str) -> dict[str, float]:
    """The stage's entry point; returns the figures written to eval_<strategy>.json."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import configure, tracked_run

    started = time.perf_counter()
    model_dir = paths.model_dir(strategy)
    run_info = read_run_info(model_dir, strategy)
    configure(params.mlflow.experiment)
    existing_run(run_info, model_dir, strategy)  # fail before the work, not after it
    network, config = load_trained(model_dir, strategy)
    manifest = read_manifest(paths.shards)
    _check_compatible(config, manifest, strategy)
    classes = list(config["classes"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    val = _evaluate_split(network, paths, manifest, "val", params, device)
    if val is None:
        raise UserError(
            "the validation split is empty: check data.val_fraction and run `dvc repro preprocess`"
        )
    metrics = classification_metrics(*val, prefix="val_")
    val_text, val_dict = class_report(val[0], val[1], classes)
    test = _evaluate_split(network, paths, manifest, "test", params, device)
    test_text, test_dict = None, None
    if test is None:
        metrics["test_images"] = 0
    else:
        metrics.update(classification_metrics(*test, prefix="test_"))
        test_text, test_dict = class_report(test[0], test[1], classes)
    external = _evaluate_external(network, paths, manifest, params, device, strategy)
    metrics.update(external[0])
    external_text, external_dict = external[1], external[2]
    metrics["eval_seconds"] = time.perf_counter() - started

    paths.metrics.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths.eval_metrics(strategy), metrics)
    atomic_write_bytes(paths.eval_predictions(strategy), predictions_csv(val[0], val[1], classes))
    title = (
        f"{strategy}: validation, {metrics['val_images']} images, accuracy {metrics['val_accuracy']:.3f}, "
        f"macro F1 {metrics['val_macro_f1']:.3f}"
    )
    atomic_write_bytes(paths.eval_confusion_png(strategy), confusion_png(val[0], val[1], classes, title))
    report = _report_text(strategy, run_info["run_id"], val_text, test_text, metrics)
    report += "\n" + _external_report_text(external_text, metrics)

    with tracked_run(
        params.mlflow.experiment,
        "evaluate",
        strategy=strategy,
        run_id=run_info["run_id"],
        tags={"evaluated": "true", "eval_precision": precision(device, params.train.bf16)},
        keep_status_on_error=True,
    ):
        client = MlflowClient()
        mlflow.log_metrics(
            {k: float(v) for k, v in metrics.items()}, step=_metric_step(client, run_info["run_id"])
        )
        log_splits(manifest, ("val", "test", "external"))
        mlflow.set_tags(fingerprint_tags(manifest, ("val", "external")))
        for path in (
            paths.eval_metrics(strategy),
            paths.eval_confusion_png(strategy),
            paths.eval_predictions(strategy),
        ):
            mlflow.log_artifact(str(path))
        for path in (paths.external_confusion_png(strategy), paths.external_predictions(strategy)):
            mlflow.log_artifact(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "classification_report.txt").write_text(report)
            reports = {"val": val_dict, "test": test_dict, "external": external_dict}
            (Path(tmp) / "classification_report.json").write_text(json.dumps(reports, indent=2))
            mlflow.log_artifact(str(Path(tmp) / "classification_report.txt"))
            mlflow.log_artifact(str(Path(tmp) / "classification_report.json"))

    print(report)
    print(
        f"evaluate {strategy}: val accuracy {metrics['val_accuracy']:.4f}, "
        f"macro F1 {metrics['val_macro_f1']:.4f}, top-3 {metrics['val_top3_accuracy']:.4f} "
        f"over {metrics['val_images']} images (run {run_info['run_id']})"
    )
    if metrics["external_images"]:
        print(
            f"evaluate {strategy}: external test set (other signers): accuracy"
            f" {metrics['external_accuracy']:.4f}, macro F1 {metrics['external_macro_f1']:.4f}"
            f" over {metrics['external_images']} images"
        )
    return metrics
