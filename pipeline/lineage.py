"""Which data a run saw: fingerprints of the shard splits, recorded as MLflow datasets and tags.

A split's fingerprint is a digest of its shards' sha256s, image size and classes: equal fingerprints
mean the same images, prepared the same way, in the same order. Training and evaluation runs log
their splits with `mlflow.log_input`, so the MLflow UI's Dataset column tells runs on other data apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePath
from typing import Any

SHARDS_DVC_PATH = "data/shards"
"""Where the shards live in the repository (DVC's output path): the datasets' source."""
MANIFEST_ARTIFACT = "data/manifest.json"
"""The training run's copy of the manifest: which files it trained on, for later comparisons."""
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test", "external": "external_test"}


def fingerprint_tag(split: str) -> str:
    """Run and model-version tag holding the fingerprint of the `split` a model was measured on."""
    return f"data_fingerprint.{split}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def split_fingerprint(manifest: dict, split: str) -> str:
    """Digest of one split: its shards' sha256s in order, the image size and the classes."""
    shards = [shard["sha256"] for shard in manifest["shards"] if shard["split"] == split]
    return _digest(
        {
            "split": split,
            "shards": shards,
            "image_size": manifest["image_size"],
            "classes": manifest["classes"],
        }
    )


def manifest_digest(manifest: dict) -> str:
    """Digest of every split together: the whole shard set a stage read."""
    return _digest({split: split_fingerprint(manifest, split) for split in sorted(manifest["splits"])})


def split_files(manifest: dict, split: str) -> list[str]:
    """The source file of every image of `split`, in the order `load_split` returns them."""
    return [name for shard in manifest["shards"] if shard["split"] == split for name in shard["files"]]


def _data_name(manifest: dict, split: str) -> str:
    """`synthetic-val`, `kaggle-train`, `asl_alphabet-external`: the source and the split."""
    params = manifest.get("params", {})
    source = params.get("external_test") if split == "external" else params.get("source")
    return f"{PurePath(str(source or 'data')).name or 'data'}-{split}"


def log_splits(manifest: dict, splits: tuple[str, ...]) -> None:
    """Log each non-empty split as an MLflow dataset input of the active run (MLflow keeps the
    first record of a dataset a run logs, so evaluating after training adds only the new splits)."""
    import mlflow
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]
    from mlflow.types import Schema, TensorSpec

    size = int(manifest["image_size"])
    schema = Schema(
        [
            TensorSpec(np.dtype(np.float16), (-1, 3, size, size), "images"),
            TensorSpec(np.dtype(np.int64), (-1,), "labels"),
        ]
    )
    digest = manifest_digest(manifest)
    for split in splits:
        count = manifest["splits"].get(split, {}).get("count", 0)
        if not count:
            continue
        dataset = MetaDataset(  # type: ignore[abstract]
            LocalArtifactDatasetSource(SHARDS_DVC_PATH),
            name=_data_name(manifest, split),
            digest=split_fingerprint(manifest, split),
            schema=schema,
        )
        tags = {"split": split, "images": str(count), "dvc_path": SHARDS_DVC_PATH, "manifest_digest": digest}
        mlflow.log_input(dataset, context=SPLIT_CONTEXTS.get(split, split), tags=tags)


def fingerprint_tags(manifest: dict, splits: tuple[str, ...]) -> dict[str, str]:
    """`{data_fingerprint.<split>: digest}` for the non-empty splits, and the manifest's digest."""
    tags = {fingerprint_tag("manifest"): manifest_digest(manifest)}
    for split in splits:
        if manifest["splits"].get(split, {}).get("count", 0):
            tags[fingerprint_tag(split)] = split_fingerprint(manifest, split)
    return tags


def log_training_data(manifest: dict, manifest_path: Path) -> None:
    """What a training run records about its data: the splits as datasets, the manifest as an artifact."""
    import mlflow

    log_splits(manifest, ("train", "val"))
    mlflow.set_tags(fingerprint_tags(manifest, ("train", "val")))
    mlflow.log_artifact(str(manifest_path), str(PurePath(MANIFEST_ARTIFACT).parent))
