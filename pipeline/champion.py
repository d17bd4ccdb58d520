"""The current champion measured on the candidate's evaluation data, or the reason it cannot be.

`promote` compares a candidate with the champion only on one evaluation set. A champion's figures
are reused when they were recorded on data with the same fingerprint; otherwise the champion is
loaded from the registry and scored on the candidate's split: from the shards when it prepares images
as they were prepared, else from the raw files through its own preprocessing. A champion that
trained on any of those images (another split of the same frames) is never scored on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.dataset import CLASSES
from pipeline.lineage import MANIFEST_ARTIFACT, fingerprint_tag, split_files, split_fingerprint
from pipeline.paths import Paths


@dataclass(frozen=True)
class ChampionScore:
    """The champion's figures on one split of the candidate's data, or why there are none."""

    split: str
    fingerprint: str
    """The candidate's split the figures are (or would have been) measured on."""
    metrics: dict[str, float] | None
    how: str
    """How the figures were obtained, or why the champion could not be scored."""
    leaked: bool = False
    """Refused because the champion trained on images of this split."""

    def record(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "compared": self.metrics is not None, "how": self.how}


class Unscorable(Exception):
    """The champion cannot be measured on the split; the message says why."""


class TrainedOn(Unscorable):
    """The champion trained on images of the split: scoring it there would flatter it."""


def score_champion(
    version, manifest: dict, paths: Paths, split: str, wanted: list[str], batch_size: int
) -> ChampionScore:
    """The champion `version`'s `wanted` metrics (`<split>_*` names) on `split` of `manifest`."""
    fingerprint = split_fingerprint(manifest, split)
    tags = version.tags or {}
    if tags.get(fingerprint_tag(split)) == fingerprint and all(_is_number(tags.get(m)) for m in wanted):
        return ChampionScore(
            split, fingerprint, {m: float(tags[m]) for m in wanted}, f"recorded on the same {split} data"
        )
    try:
        _refuse_if_trained_on(version, manifest, split)
        figures, how = _score(version, manifest, paths, split, batch_size)
    except Unscorable as why:
        return ChampionScore(split, fingerprint, None, str(why), leaked=isinstance(why, TrainedOn))
    return ChampionScore(split, fingerprint, {m: figures[m] for m in wanted}, how)


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and np.isfinite(float(text))
    except ValueError:
        return False


def training_files(run_id: str) -> set[str] | None:
    """The files a training run trained on, from the manifest it logged; None if it logged none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import unreachable

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MANIFEST_ARTIFACT)
        manifest = json.loads(Path(local).read_text())
    except (MlflowException, OSError, json.JSONDecodeError) as err:
        if unreachable(err):  # a server that went away is not "no record"
            raise
        return None
    return set(split_files(manifest, "train"))


def _refuse_if_trained_on(version, manifest: dict, split: str) -> None:
    files = split_files(manifest, split)
    trained = training_files(version.run_id) if version.run_id else None
    if trained is None:
        raise Unscorable(
            f"version {version.version}'s training run records no list of the files it trained on"
            f" ({MANIFEST_ARTIFACT}), so it may have trained on these {split} images"
        )
    overlap = sorted(trained.intersection(files))
    if overlap:
        raise TrainedOn(
            f"version {version.version} trained on {len(overlap)} of these {len(files)} {split} images"
            f" (e.g. {overlap[0]}): another split of the same frames, so its figure would flatter it"
        )


def _score(
    version, manifest: dict, paths: Paths, split: str, batch_size: int
) -> tuple[dict[str, float], str]:
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from pipeline.evaluate import classification_metrics
    from pipeline.serving.networks import class_probabilities
    from pipeline.shards import load_split
    from pipeline.tracking import unreachable

    uri = f"models:/{version.name}/{version.version}"
    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as err:
        if unreachable(err):
            raise
        raise Unscorable(
            f"version {version.version} could not be loaded from the registry ({type(err).__name__})"
        ) from None
    served = model.unwrap_python_model()
    if list(served.classes) != list(manifest["classes"]):
        raise Unscorable(f"version {version.version} predicts other classes than the candidate's data holds")
    same_inputs = (int(served.image_size), list(served.mean), list(served.std)) == (
        int(manifest["image_size"]),
        list(manifest["mean"]),
        list(manifest["std"]),
    )
    if same_inputs:
        images, labels = load_split(paths.shards, split, manifest)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        probabilities = class_probabilities(served.network, images, batch_size, device)
        y_true, how = labels.numpy(), f"scored from the {split} shards"
    else:
        y_true, probabilities = _score_raw(model, manifest, paths, split, batch_size)
        how = f"scored from the raw {split} images through its own preprocessing ({served.image_size} px)"
    return classification_metrics(
        y_true, probabilities.argmax(axis=1), probabilities, prefix=f"{split}_"
    ), how


def _score_raw(
    model, manifest: dict, paths: Paths, split: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The champion's probabilities for the split's original files, which it decodes and resizes itself."""
    import pandas as pd

    root = paths.raw_external if split == "external" else paths.raw
    files = split_files(manifest, split)
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise Unscorable(
            f"the champion prepares images differently and needs the raw {split} files, but {len(missing)}"
            f" are missing (e.g. {root / missing[0]}): run `dvc checkout` or `dvc repro fetch`"
        )
    labels = np.array([CLASSES.index(PurePosixPath(name).parent.name) for name in files])
    chunks = []
    for start in range(0, len(files), batch_size):
        encoded = [(root / name).read_bytes() for name in files[start : start + batch_size]]
        predicted = model.predict(pd.DataFrame({"image": encoded}))
        chunks.append(np.stack(predicted["probabilities"].to_numpy()))
    return labels, np.concatenate(chunks)
