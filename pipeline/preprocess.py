"""Stage `preprocess`: data/raw/ (Kaggle layout) -> data/shards/ (normalized tensor shards + manifest).

    python -m pipeline preprocess

Images are decoded and resized once, in parallel: each worker makes whole shards, so memory holds
a shard per worker, not the data set. Unreadable files are skipped and reported; too many of them
is an error.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import DataConfig, Params
from pipeline.dataset import CLASSES
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json
from pipeline.paths import Paths
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, is_image_name, normalize
from pipeline.shards import split_shard_size, write_shard
from pipeline.split import block_split, frame_order, random_split, stratified_cap
from pipeline.workers import process_pool, usable_cores

Job = tuple[Path, int]  # (image file, label)


def scan_train(train_dir: Path) -> list[list[Path]]:
    """Image files of each class, in frame order; index = label."""
    if not train_dir.is_dir():
        raise UserError(f"no training images at {train_dir}: run `dvc repro fetch` first")
    per_class = []
    for name in CLASSES:
        folder = train_dir / name
        files = []
        if folder.is_dir():
            with os.scandir(
                folder
            ) as entries:  # no stat() per file, unlike Path.is_file(): 87,000 files add up
                files = [
                    Path(e.path)
                    for e in entries
                    if is_image_name(e.name) and not e.name.startswith(".") and e.is_file()
                ]
        per_class.append([files[i] for i in frame_order([p.stem for p in files])])
    if sum(map(len, per_class)) == 0:
        raise UserError(
            f"{train_dir} holds no images in class folders ({', '.join(CLASSES[:3])}, ...): check data.source"
        )
    empty = [name for name, files in zip(CLASSES, per_class, strict=True) if not files]
    if empty:
        # Not fatal: a data set may lack a class on purpose; but the model will never predict it.
        print(
            f"warning: no training images for class(es) {', '.join(empty)} in {train_dir}: "
            "the model cannot learn them",
            file=sys.stderr,
        )
    return per_class


def scan_test(test_dir: Path) -> list[Job]:
    """`<class>_test.jpg` files; the class is the part before `_test`."""
    if not test_dir.is_dir():
        return []
    jobs = []
    for path in sorted(test_dir.iterdir()):
        label_name = path.stem.rsplit("_test", 1)[0]
        if is_image_name(path.name) and label_name in CLASSES:
            jobs.append((path, CLASSES.index(label_name)))
    return jobs


def scan_external(external_dir: Path | None) -> list[Job]:
    """`<class>/<image>` files of the external test set, class by class; none without the folder."""
    if external_dir is None or not external_dir.is_dir():
        return []
    jobs = []
    for label, name in enumerate(CLASSES):
        folder = external_dir / name
        if folder.is_dir():
            names = (p for p in folder.iterdir() if is_image_name(p.name) and not p.name.startswith("."))
            files = sorted(names)
            jobs += [(path, label) for path in files]
    return jobs


def plan_splits(per_class: list[list[Path]], cfg: DataConfig, seed: int) -> tuple[dict[str, list[Job]], int]:
    """Cap, then split each class; returns the jobs per split and the frames dropped as gap."""
    rng = np.random.default_rng(seed)
    kept = stratified_cap([len(files) for files in per_class], cfg.max_images, rng)
    plan: dict[str, list[Job]] = {"train": [], "val": []}
    dropped = 0
    for label, (files, positions) in enumerate(zip(per_class, kept, strict=True)):
        chosen = [files[i] for i in positions]
        if not chosen:
            continue  # reported by scan_train; the class shows as 0 in the counts
        if len(chosen) < 2:
            raise UserError(
                f"class {CLASSES[label]} has only {len(chosen)} image: "
                "too few to split into training and validation; "
                "add images to its folder, or remove the folder and accept a class the model never sees"
            )
        try:
            if cfg.split == "block":
                split = block_split(len(chosen), cfg.val_fraction, cfg.block_size, cfg.block_gap, rng)
            else:
                split = random_split(len(chosen), cfg.val_fraction, rng)
        except ValueError as err:
            raise UserError(f"class {CLASSES[label]}: {err}") from None
        plan["train"] += [(chosen[i], label) for i in split.train]
        plan["val"] += [(chosen[i], label) for i in split.val]
        dropped += len(split.dropped)
    # Training shards hold a random sample of every class, not a class each: streamed training
    # shuffles whole shards and then within a buffer of a few shards, so each batch mixes classes.
    plan["train"] = [plan["train"][i] for i in rng.permutation(len(plan["train"]))]
    return plan, dropped


def float16_levels(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, 256): what `normalize(...).astype(float16)` makes of each uint8 level of each channel.

    Looking pixels up in this table gives bit-identical shards without float32 temporaries.
    """
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None]  # a 1x256 RGB image
    return normalize(levels, mean, std).astype(np.float16)[:, 0, :]


_LEVELS = float16_levels()
_NORMALIZE_BLOCK = 64  # images normalized together: np.take's int64 index temporary stays in cache


def normalize_into(pixels: np.ndarray, out: np.ndarray) -> None:
    """out = normalize(pixels).astype(float16), for uint8 N x S x S x 3 pixels: see float16_levels."""
    for channel in range(3):
        np.take(_LEVELS[channel], pixels[..., channel], out=out[:, channel], mode="clip")


@dataclass(frozen=True)
class ShardTask:
    """One shard for a worker to make: its images, in order, as (file, label, name in the manifest)."""

    path: Path
    split: str
    jobs: list[tuple[str, int, str]]
    image_size: int
    max_pixels: int | None


def make_shard(task: ShardTask) -> tuple[dict | None, list[dict]]:
    """Decode, normalize and write one shard (in a worker); returns its manifest entry (None when
    none of its images could be read, and then no file) and the files skipped, with the reason.

    Each worker makes whole shards: the stage's process does no per-image work, and a worker holds
    one shard, whatever the data set's size."""
    size = task.image_size
    images = np.empty((len(task.jobs), 3, size, size), dtype=np.float16)
    block = np.empty((_NORMALIZE_BLOCK, size, size, 3), dtype=np.uint8)
    labels: list[int] = []
    files: list[str] = []
    skipped = []
    for file, label, name in task.jobs:
        try:
            block[len(labels) % _NORMALIZE_BLOCK] = decode_image(file, size, task.max_pixels)
        except Exception as err:  # noqa: BLE001 -- any decoder failure means "skip this file", with the reason
            skipped.append({"file": name, "reason": f"{type(err).__name__}: {err}"})
            continue
        labels.append(label)
        files.append(name)
        if len(labels) % _NORMALIZE_BLOCK == 0:
            normalize_into(block, images[len(labels) - _NORMALIZE_BLOCK : len(labels)])
    pending = len(labels) % _NORMALIZE_BLOCK
    normalize_into(block[:pending], images[len(labels) - pending : len(labels)])
    if not labels:
        return None, skipped
    sha256 = write_shard(task.path, images[: len(labels)], np.asarray(labels))
    return {
        "file": task.path.name,
        "split": task.split,
        "count": len(labels),
        "sha256": sha256,
        "per_class": dict(Counter(CLASSES[label] for label in labels)),
        "files": files,
    }, skipped


def shard_tasks(
    plan: dict[str, list[Job]], roots: dict[str, Path], out_dir: Path, cfg: DataConfig
) -> list[ShardTask]:
    """Every split's jobs cut into shards (of `data.shard_size`, or see split_shard_size), in order;
    names as in the manifest, relative to the split's root folder."""
    tasks = []
    for split, jobs in plan.items():
        shard_size = cfg.shard_size or split_shard_size(cfg.image_size, len(jobs))
        prefix = str(roots[split]) + os.sep
        for number, begin in enumerate(range(0, len(jobs), shard_size)):
            chunk = jobs[begin : begin + shard_size]
            named = [(str(path), label, _relative(path, prefix)) for path, label in chunk]
            path = out_dir / f"{split}-{number:05d}.safetensors"
            tasks.append(ShardTask(path, split, named, cfg.image_size, cfg.max_image_pixels))
    return tasks


def _relative(path: Path, prefix: str) -> str:
    """`path.relative_to(root).as_posix()` for `prefix` = root + separator, without pathlib's cost
    on every one of 87,000 images."""
    text = str(path)
    if os.sep == "/" and text.startswith(prefix):
        return text[len(prefix) :]
    return path.relative_to(prefix).as_posix()


def _renumber(out_dir: Path, shards: list[dict]) -> None:
    """Number each split's shards 0, 1, 2, ... again where a shard none of whose images could be
    read left a gap (it has no file)."""
    for number, shard in enumerate(shards):
        name = f"{shard['split']}-{number:05d}.safetensors"
        if shard["file"] != name:
            os.replace(out_dir / shard["file"], out_dir / name)  # in order: `name` is free by now
            shard["file"] = name


def build_shards(
    cfg: DataConfig,
    seed: int,
    raw_dir: Path,
    train_dir: Path,
    test_dir: Path,
    out_dir: Path,
    *,
    external_dir: Path | None = None,
) -> dict:
    """Decode, split and shard the raw images; returns the manifest (also written to out_dir).

    `external_dir`'s class folders become the `external` split, their file names relative to it."""
    per_class = scan_train(train_dir)
    plan, dropped = plan_splits(per_class, cfg, seed)
    plan["test"] = scan_test(test_dir)
    plan["external"] = scan_external(external_dir)
    total = sum(map(len, plan.values()))
    if out_dir.exists():
        shutil.rmtree(out_dir)  # stale shards of an earlier run must not survive beside new ones
    out_dir.mkdir(parents=True)

    # Not one per host core: each worker holds a shard, which could exhaust a small container's memory.
    workers = cfg.workers or usable_cores()
    roots = {split: external_dir if split == "external" and external_dir else raw_dir for split in plan}
    tasks = shard_tasks(plan, roots, out_dir, cfg)
    shards: dict[str, list[dict]] = {split: [] for split in plan}
    skipped: list[dict] = []
    # Not multiprocessing.Pool: its worker-handler thread spins while results wait in the pipe (CPU
    # the parent needs), and a dead worker hangs it forever.
    pool = process_pool(workers, preload=[__name__])
    try:
        with tqdm(total=total, desc="preprocess", unit="img", disable=not sys.stderr.isatty()) as progress:
            for task, (shard, shard_skipped) in zip(tasks, pool.map(make_shard, tasks), strict=True):
                if shard is not None:
                    shards[task.split].append(shard)
                skipped += shard_skipped
                progress.update(len(task.jobs))
    finally:
        pool.shutdown(
            wait=True, cancel_futures=True
        )  # after a failure: drop the queued work, don't finish it
    for split_shards in shards.values():
        _renumber(out_dir, split_shards)

    if total and len(skipped) / total > cfg.max_skipped_fraction:
        examples = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:3])
        raise UserError(
            f"{len(skipped)} of {total} images could not be read (limit data.max_skipped_fraction="
            f"{cfg.max_skipped_fraction}), e.g. {examples}: check data.source points at the right data"
        )
    manifest = make_manifest(cfg, [shard for split in shards.values() for shard in split], skipped, dropped)
    atomic_write_json(out_dir / "manifest.json", manifest)  # written last: its presence means "complete"
    return manifest


def shard_workspace(params: Params, paths: Paths) -> dict:
    """`build_shards` on a workspace's own data/raw and data/external, as the stage runs it."""
    return build_shards(
        params.data, params.seed, paths.raw, paths.raw_train, paths.raw_test, paths.shards,
        external_dir=paths.raw_external,
    )  # fmt: skip


def make_manifest(cfg: DataConfig, shards: list[dict], skipped: list[dict], dropped: int) -> dict:
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "val", "test", "external"):
        counts: Counter = Counter()
        for shard in (s for s in shards if s["split"] == split):
            counts.update(shard["per_class"])
        splits[split] = {"count": sum(counts.values()), "per_class": {c: counts.get(c, 0) for c in CLASSES}}
    return {
        "classes": list(CLASSES),
        "image_size": cfg.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "splits": splits,
        "shards": shards,
        "skipped": skipped,
        "dropped_for_gap": dropped,
        "empty_classes": [
            c for c in CLASSES if splits["train"]["per_class"][c] + splits["val"]["per_class"][c] == 0
        ],
        "params": asdict(cfg),
    }


def run_preprocess(params: Params, paths: Paths) -> dict:
    """The stage: build the shards and record the run in MLflow."""
    import mlflow

    from pipeline.config import to_flat_dict
    from pipeline.tracking import tracked_run

    cfg = params.data
    with tracked_run(
        params.mlflow.experiment, "preprocess", params={"seed": params.seed, **to_flat_dict(cfg, "data.")}
    ):
        started = time.perf_counter()
        manifest = shard_workspace(params, paths)
        seconds = time.perf_counter() - started
        decoded = sum(split["count"] for split in manifest["splits"].values())
        mlflow.log_metrics(
            {
                **{f"{split}_images": info["count"] for split, info in manifest["splits"].items()},
                "skipped_files": len(manifest["skipped"]),
                "dropped_for_gap": manifest["dropped_for_gap"],
                "preprocess_seconds": seconds,
                "images_per_second": decoded / seconds if seconds > 0 else 0.0,
            }
        )
        mlflow.log_artifact(str(paths.manifest))
        if manifest["skipped"]:
            mlflow.log_dict(manifest["skipped"], "skipped_files.json")
    counts = ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items())
    print(
        f"preprocess: {counts} images at {cfg.image_size}px in {len(manifest['shards'])} shards, "
        f"{len(manifest['skipped'])} skipped, "
        f"{manifest['dropped_for_gap']} dropped beside validation blocks, "
        f"{seconds:.1f}s ({decoded / max(seconds, 1e-9):.0f} images/s)"
    )
    return manifest
