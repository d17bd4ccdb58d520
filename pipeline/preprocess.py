"""Stage `preprocess`: data/raw/ (Kaggle layout) -> data/shards/ (normalized tensor shards + manifest).

    python -m pipeline preprocess

Images are decoded and resized once, in parallel, streaming: memory holds a shard per split, not
the data set. Unreadable files are skipped and reported; too many of them is an error.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import asdict
from itertools import islice
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
from pipeline.shards import auto_shard_size, write_shard
from pipeline.split import block_split, frame_order, random_split, stratified_cap
from pipeline.workers import process_pool

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


DecodeTask = tuple[int, str, int, int]  # (index in the stream, image file, image size, pixel limit)
Decoded = tuple[int, np.ndarray | None, str]  # (index, HxWx3 uint8 pixels or None, why not)


def _decode_job(job: DecodeTask) -> Decoded:
    index, path, size, max_pixels = job
    try:
        return index, decode_image(path, size, max_pixels), ""
    except Exception as err:  # noqa: BLE001 -- any decoder failure means "skip this file", with the reason
        return index, None, f"{type(err).__name__}: {err}"


def _decode_chunk(jobs: list[DecodeTask]) -> list[Decoded]:
    return [_decode_job(job) for job in jobs]


def decode_in_order(
    pool: Executor, tasks: Iterable[DecodeTask], chunk_size: int, window: int
) -> Iterator[Decoded]:
    """The decoded tasks, in order, with at most `window` chunks of `chunk_size` in the pool.

    Like `pool.map(_decode_job, tasks, chunksize=chunk_size)`, but Executor.map submits every task
    up front: whenever the parent fell behind (a slow disk during a shard write), decoded images
    would pile up in memory with no bound but the data set.
    """
    tasks = iter(tasks)  # islice must consume it: a list would start over every time
    in_flight: deque[Future] = deque()
    for chunk in iter(lambda: list(islice(tasks, chunk_size)), []):
        in_flight.append(pool.submit(_decode_chunk, chunk))
        if len(in_flight) >= window:
            yield from in_flight.popleft().result()
    while in_flight:
        yield from in_flight.popleft().result()


def float16_levels(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, 256): what `normalize(...).astype(float16)` makes of each uint8 level of each channel.

    Looking pixels up in this table gives bit-identical shards without float32 temporaries.
    """
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None]  # a 1x256 RGB image
    return normalize(levels, mean, std).astype(np.float16)[:, 0, :]


_NORMALIZE_BLOCK = 64  # images per np.take call when normalizing a shard


class ShardWriter:
    """Collects decoded images of one split and writes a shard every `shard_size` images."""

    def __init__(self, out_dir: Path, split: str, image_size: int, shard_size: int, source_root: Path):
        self.out_dir, self.split, self.shard_size, self.source_root = out_dir, split, shard_size, source_root
        self._prefix = str(source_root) + os.sep
        self.pixels = np.empty((shard_size, image_size, image_size, 3), dtype=np.uint8)
        self.images = np.empty(
            (shard_size, 3, image_size, image_size), dtype=np.float16
        )  # reused by every flush
        self.levels = float16_levels()
        self.labels: list[int] = []
        self.files: list[str] = []
        self.shards: list[dict] = []

    def add(self, pixels: np.ndarray, label: int, path: Path) -> None:
        self.pixels[len(self.labels)] = pixels
        self.labels.append(label)
        self.files.append(self.relative_name(path))
        if len(self.labels) == self.shard_size:
            self.flush()

    def relative_name(self, path: Path) -> str:
        """`path.relative_to(source_root).as_posix()`, without pathlib's cost on every image."""
        text = str(path)
        if os.sep == "/" and text.startswith(self._prefix):
            return text[len(self._prefix) :]
        return path.relative_to(self.source_root).as_posix()

    def flush(self) -> None:
        count = len(self.labels)
        if count == 0:
            return
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        images = self.images[:count]
        # = normalize(self.pixels[:count]).astype(np.float16), see float16_levels. In blocks, because
        # np.take makes an int64 temporary of its indices: a block's stays in cache, a shard's would not.
        for begin in range(0, count, _NORMALIZE_BLOCK):
            end = min(begin + _NORMALIZE_BLOCK, count)
            for channel in range(3):
                np.take(
                    self.levels[channel],
                    self.pixels[begin:end, :, :, channel],
                    out=images[begin:end, channel],
                    mode="clip",
                )
        sha256 = write_shard(self.out_dir / name, images, np.asarray(self.labels))
        per_class = Counter(CLASSES[label] for label in self.labels)
        self.shards.append(
            {
                "file": name,
                "split": self.split,
                "count": count,
                "sha256": sha256,
                "per_class": dict(per_class),
                "files": self.files,
            }
        )
        self.labels, self.files = [], []


def decode_into_shards(
    pool: Executor,
    plan: dict[str, list[Job]],
    writers: dict[str, ShardWriter],
    cfg: DataConfig,
    progress: tqdm,
    workers: int,
) -> list[dict]:
    """Decode every split's jobs, in order, feeding each split's writer; returns the skipped files.

    One stream for all splits, and each split's last shard written as soon as its last image
    arrives: the workers go on decoding the next split meanwhile instead of waiting for the parent."""
    jobs = [(split, path, label) for split, split_jobs in plan.items() for path, label in split_jobs]
    last_job = {split: index for index, (split, _, _) in enumerate(jobs)}
    tasks = ((i, str(path), cfg.image_size, cfg.max_image_pixels) for i, (_, path, _) in enumerate(jobs))
    skipped = []
    # Two chunks per worker: one it decodes, one waiting, so no worker idles while the parent catches up.
    for index, pixels, reason in decode_in_order(pool, tasks, chunk_size=64, window=2 * workers):
        split, path, label = jobs[index]
        if pixels is None:
            skipped.append({"file": writers[split].relative_name(path), "reason": reason})
        else:
            writers[split].add(pixels, label, path)
        if index == last_job[split]:
            writers[split].flush()
        progress.update(1)
    return skipped


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

    workers = cfg.workers or os.cpu_count() or 1
    shard_size = cfg.shard_size or auto_shard_size(cfg.image_size)
    roots = {split: external_dir if split == "external" and external_dir else raw_dir for split in plan}
    writers = {
        split: ShardWriter(out_dir, split, cfg.image_size, min(shard_size, max(1, len(jobs))), roots[split])
        for split, jobs in plan.items()
    }
    # Not multiprocessing.Pool: its worker-handler thread spins while results wait in the pipe (CPU
    # the parent needs), and a dead worker hangs it forever.
    pool = process_pool(workers, preload=[__name__])
    try:
        with tqdm(total=total, desc="preprocess", unit="img", disable=not sys.stderr.isatty()) as progress:
            skipped = decode_into_shards(pool, plan, writers, cfg, progress, workers)
    finally:
        pool.shutdown(
            wait=True, cancel_futures=True
        )  # after a failure: drop the queued work, don't finish it

    if total and len(skipped) / total > cfg.max_skipped_fraction:
        examples = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:3])
        raise UserError(
            f"{len(skipped)} of {total} images could not be read (limit data.max_skipped_fraction="
            f"{cfg.max_skipped_fraction}), e.g. {examples}: check data.source points at the right data"
        )
    shards = [shard for writer in writers.values() for shard in writer.shards]
    manifest = make_manifest(cfg, shards, skipped, dropped)
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
