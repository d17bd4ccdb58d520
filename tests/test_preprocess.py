"""Stage `preprocess`: raw images -> checksummed float16 shards + manifest. The manifest tells the
truth, the block split does not leak neighbouring frames, bad files are skipped (odd-but-valid
ones converted), parallel equals serial, a failure leaves no half-written output, and the run is
recorded in MLflow."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from pipeline import fileio, preprocess
from pipeline.config import DataConfig, params_from_dict
from pipeline.dataset import CLASSES, kaggle_test_dir, kaggle_train_dir
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_bytes, sha256_of
from pipeline.paths import Paths
from pipeline.preprocess import build_shards, run_preprocess
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, normalize
from pipeline.shards import (
    auto_shard_size,
    image_bytes,
    load_split,
    read_manifest,
    split_shard_size,
    write_shard,
)
from pipeline.split import block_split, frame_number, random_split
from pipeline.synthetic import generate_synthetic_dataset

from conftest import REPO, split_files

TRAIN_DIR, TEST_DIR = kaggle_train_dir(Path()), kaggle_test_dir(Path())  # relative to a data/raw folder

PER_CLASS = 20
CFG = DataConfig(image_size=32, shard_size=64, block_size=5, block_gap=1, val_fraction=0.2, workers=2)


def build(raw: Path, out: Path, cfg: DataConfig = CFG, seed: int = 0) -> dict:
    return build_shards(cfg, seed, raw, raw / TRAIN_DIR, raw / TEST_DIR, out)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """29 classes x 20 frames (runs of 5 near-duplicates) at 64 px, + 28 test images. Read only."""
    root = tmp_path_factory.mktemp("raw")
    generate_synthetic_dataset(root, images_per_class=PER_CLASS, frames_per_run=5, seed=0, size=64, workers=2)
    return root


@pytest.fixture(scope="module")
def built(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built") / "shards"
    return out, build(raw, out)


def _copy_raw(raw: Path, dest: Path) -> Path:
    shutil.copytree(raw, dest)
    return dest


def _class_and_frame(name: str) -> tuple[str, int | None]:
    path = Path(name)
    return path.parent.name, frame_number(path.stem)


def _class_and_numbered_frame(name: str) -> tuple[str, int]:
    """Of a training image: every one has a frame number."""
    folder, frame = _class_and_frame(name)
    assert frame is not None, name
    return folder, frame


def _denormalize(chw: torch.Tensor) -> np.ndarray:
    """float16 3xSxS (normalized) -> float HxWx3 in 0..255."""
    pixels = chw.float().numpy().transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return pixels * 255.0


# --- manifest and shards ------------------------------------------------------------------------


def test_manifest_adds_up_and_matches_the_shards(built: tuple[Path, dict]) -> None:
    out, manifest = built

    assert manifest == read_manifest(out), "the returned manifest is the one written"
    assert manifest["classes"] == list(CLASSES)
    assert manifest["image_size"] == 32
    assert manifest["mean"] == list(IMAGENET_MEAN) and manifest["std"] == list(IMAGENET_STD)
    assert manifest["params"] == asdict(CFG)
    assert manifest["skipped"] == []
    assert set(manifest["splits"]) == {"train", "val", "test", "external"}
    assert manifest["splits"]["external"]["count"] == 0, "no external folder given"

    for split, info in manifest["splits"].items():
        if split == "external":
            continue
        split_shards = [s for s in manifest["shards"] if s["split"] == split]
        assert list(info["per_class"]) == list(CLASSES)
        assert info["count"] == sum(info["per_class"].values()) == sum(s["count"] for s in split_shards)
        per_class_from_shards: Counter = Counter()
        for shard in split_shards:
            per_class_from_shards.update(shard["per_class"])
        assert {c: per_class_from_shards.get(c, 0) for c in CLASSES} == info["per_class"]
        assert [s["file"] for s in split_shards] == [
            f"{split}-{i:05d}.safetensors" for i in range(len(split_shards))
        ]
        assert (
            all(s["count"] == CFG.shard_size for s in split_shards[:-1])
            and 0 < split_shards[-1]["count"] <= CFG.shard_size
        )

    # Nothing lost: every training-folder frame is in train, in val, or dropped beside a val block.
    assert (
        manifest["splits"]["train"]["count"]
        + manifest["splits"]["val"]["count"]
        + manifest["dropped_for_gap"]
        == 29 * PER_CLASS
    )
    # gap 1: one dropped frame beside each val block at an end, two beside one in the middle.
    assert 29 <= manifest["dropped_for_gap"] <= 58
    assert manifest["splits"]["test"]["count"] == 28 and manifest["splits"]["test"]["per_class"]["del"] == 0

    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert sha256_of(path) == shard["sha256"]
        assert len(shard["files"]) == shard["count"] == sum(shard["per_class"].values())
        tensors = load_file(str(path))
        assert set(tensors) == {"images", "labels"}
        assert tensors["images"].dtype == np.float16 and tensors["images"].shape == (
            shard["count"],
            3,
            32,
            32,
        )
        assert tensors["labels"].dtype == np.int64 and tensors["labels"].shape == (shard["count"],)
        for name, label in zip(shard["files"], tensors["labels"].tolist(), strict=True):
            folder_class = (
                _class_and_frame(name)[0]
                if shard["split"] != "test"
                else Path(name).stem.rsplit("_test", 1)[0]
            )
            assert CLASSES[label] == folder_class, name
        assert Counter(CLASSES[i] for i in tensors["labels"].tolist()) == Counter(shard["per_class"])

    assert sorted(os.listdir(out)) == sorted(["manifest.json", *(s["file"] for s in manifest["shards"])]), (
        "no stray files"
    )


def test_load_split_returns_what_was_written(built: tuple[Path, dict], raw: Path) -> None:
    out, manifest = built
    for split in ("train", "val", "test"):
        images, labels = load_split(out, split)
        written = [load_file(str(out / s["file"])) for s in manifest["shards"] if s["split"] == split]
        assert images.dtype == torch.float16 and labels.dtype == torch.int64
        assert images.shape == (manifest["splits"][split]["count"], 3, 32, 32)
        assert torch.equal(images, torch.from_numpy(np.concatenate([w["images"] for w in written])))
        assert torch.equal(labels, torch.from_numpy(np.concatenate([w["labels"] for w in written])))
        assert len(split_files(manifest, split)) == len(labels)

    # A row is the normalized, resized source image that split_files names at the same position.
    images, _ = load_split(out, "val", manifest)
    files = split_files(manifest, "val")
    for row in (0, len(files) - 1):
        expected = normalize(decode_image(raw / files[row], 32)).astype(np.float16)
        assert np.array_equal(images[row].numpy(), expected)


def test_every_training_shard_mixes_the_classes(built: tuple[Path, dict]) -> None:
    """Streamed training shuffles within a few shards: a shard of one class would make one-class batches."""
    train = [s for s in built[1]["shards"] if s["split"] == "train"]
    assert len(train) >= 3
    for shard in train:
        assert len(shard["per_class"]) >= min(20, shard["count"] // 2), shard["file"]


@pytest.mark.parametrize("size,expected", [(32, 10922), (64, 2730), (128, 682), (224, 222)])
def test_automatic_shard_size_keeps_a_shard_near_64_mib(size: int, expected: int) -> None:
    assert auto_shard_size(size) == expected
    assert 60 * 2**20 < auto_shard_size(size) * image_bytes(size) <= 64 * 2**20


@pytest.mark.parametrize(
    "size,images,expected",
    [(64, 69_000, 2730), (64, 2385, 299), (64, 580, 256), (64, 28, 256), (224, 2385, 222)],
)
def test_a_small_split_is_cut_into_eight_shards_of_at_least_256_images(
    size: int, images: int, expected: int
) -> None:
    assert split_shard_size(size, images) == expected


def test_a_null_shard_size_writes_shards_of_the_automatic_size(raw: Path, tmp_path: Path) -> None:
    manifest = build(raw, tmp_path / "shards", replace(CFG, shard_size=None))
    for split in ("train", "val", "test"):
        counts = [s["count"] for s in manifest["shards"] if s["split"] == split]
        size = split_shard_size(CFG.image_size, sum(counts))
        assert counts[:-1] == [size] * (len(counts) - 1) and 0 < counts[-1] <= size, split
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) == 2, "464 images, 256 a shard"


def test_level_table_is_exactly_normalize() -> None:
    """The shard writer looks pixels up instead of normalizing: the result must be bit-identical."""
    levels = preprocess.float16_levels()
    every_level = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), -1)[..., 0].astype(
        np.uint8
    )  # 256x3
    random = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for pixels in (np.repeat(every_level[None, :, None, :], 2, axis=2), random):
        looked_up = np.stack([levels[c][pixels[..., c]] for c in range(3)], axis=1)
        assert np.array_equal(looked_up.view(np.uint16), normalize(pixels).astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("count,size", [(0, 8), (1, 5), (70, 32)])
def test_write_shard_round_trips_and_reports_its_sha256(tmp_path: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(count)
    images = rng.standard_normal((count, 3, size, size)).astype(np.float16)
    labels = rng.integers(0, 29, count)
    path = tmp_path / "shard.safetensors"

    sha256 = write_shard(path, images, labels)

    written = load_file(str(path))
    assert np.array_equal(written["images"], images) and np.array_equal(
        written["labels"], labels.astype(np.int64)
    )
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.listdir(tmp_path) == ["shard.safetensors"], "no temporary file left behind"


@pytest.mark.parametrize("position", ["first", "last"])
@pytest.mark.parametrize("damage", ["pixel", "header", "label", "truncated", "appended"])
def test_load_split_refuses_a_corrupt_shard(
    built: tuple[Path, dict], tmp_path: Path, damage: str, position: str
) -> None:
    out = shutil.copytree(built[0], tmp_path / "shards")
    train_shards = [s["file"] for s in built[1]["shards"] if s["split"] == "train"]
    assert len(train_shards) >= 3, "the fixture must give a split of several shards"
    victim = out / train_shards[0 if position == "first" else -1]
    data = bytearray(victim.read_bytes())
    if damage == "pixel":
        data[len(data) // 2] ^= 0x01  # one bit in the pixels: safetensors itself would not notice
    elif damage == "header":
        data[20] ^= 0x20
    elif damage == "label":
        data[8 + int.from_bytes(data[:8], "little")] ^= 0x01  # labels come first after the header
    elif damage == "truncated":
        del data[len(data) // 3 :]
    else:
        data += b"\0" * 16
    victim.write_bytes(bytes(data))

    with pytest.raises(UserError, match="corrupt.*sha256") as info:
        load_split(out, "train")
    assert "\n" not in str(info.value) and victim.name in str(info.value)


def test_a_shard_normalizes_every_block_and_skips_what_it_cannot_read(tmp_path: Path) -> None:
    """A shard of more images than one normalization block, not a whole number of blocks, with an
    unreadable file inside the first block: every kept image lands in its row, exactly normalized."""
    count = 2 * preprocess._NORMALIZE_BLOCK + 3
    pixels = np.random.default_rng(1).integers(0, 256, (count, 7, 7, 3), dtype=np.uint8)
    jobs = []
    for index, image in enumerate(pixels):
        path = tmp_path / f"{index}.png"  # lossless: the decoded pixels are these
        Image.fromarray(image).save(path)
        jobs.append((str(path), index % 29, path.name))
    (tmp_path / "5.png").write_bytes(b"not an image")
    task = preprocess.ShardTask(tmp_path / "train-00000.safetensors", "train", jobs, 7, None)

    shard, skipped = preprocess.make_shard(task)

    kept = [index for index in range(count) if index != 5]
    assert [s["file"] for s in skipped] == ["5.png"] and "UnidentifiedImageError" in skipped[0]["reason"]
    assert shard is not None and shard["count"] == count - 1 and shard["files"] == [f"{i}.png" for i in kept]
    assert shard["sha256"] == sha256_of(task.path)
    written = load_file(str(task.path))
    assert np.array_equal(
        written["images"].view(np.uint16), normalize(pixels[kept]).astype(np.float16).view(np.uint16)
    )
    assert written["labels"].tolist() == [index % 29 for index in kept]


def test_a_shard_of_unreadable_files_leaves_no_gap_in_the_names(raw: Path, tmp_path: Path) -> None:
    root = _copy_raw(raw, tmp_path / "raw")
    test_files = sorted((root / TEST_DIR).iterdir())
    for path in test_files[:8]:  # the whole first test shard (shard_size 8)
        path.write_bytes(b"not an image")

    out = tmp_path / "shards"
    manifest = build(root, out, replace(CFG, shard_size=8))

    test_shards = [s for s in manifest["shards"] if s["split"] == "test"]
    assert [s["file"] for s in test_shards] == [f"test-{i:05d}.safetensors" for i in range(len(test_shards))]
    assert sum(s["count"] for s in test_shards) == len(test_files) - 8
    assert sorted(p.name for p in out.glob("test-*")) == [s["file"] for s in test_shards]
    images, labels = load_split(out, "test", manifest)
    assert len(images) == len(labels) == len(test_files) - 8


def test_a_split_whose_last_file_is_unreadable_keeps_its_other_images(raw: Path, tmp_path: Path) -> None:
    root = _copy_raw(raw, tmp_path / "raw")
    last = sorted((root / TEST_DIR).iterdir())[-1]  # the test split's last image in the decode stream
    last.write_bytes(b"not an image")

    manifest = build(root, tmp_path / "shards")

    assert [s["file"] for s in manifest["skipped"]] == [(TEST_DIR / last.name).as_posix()]
    assert manifest["splits"]["test"]["count"] == 27
    images, labels = load_split(tmp_path / "shards", "test", manifest)
    assert len(images) == len(labels) == 27


def test_load_split_refuses_a_shard_the_manifest_does_not_describe(built: tuple[Path, dict]) -> None:
    manifest = {**built[1], "shards": [dict(s) for s in built[1]["shards"]]}
    manifest["shards"][0]["count"] -= 1  # checksum still right: the file is intact, the manifest is not
    with pytest.raises(UserError, match="does not match manifest.json"):
        load_split(built[0], "train", manifest)


def test_load_split_without_shards_says_to_preprocess(built: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="manifest.json is missing.*preprocess"):
        load_split(tmp_path / "nothing-here", "train")

    out = shutil.copytree(built[0], tmp_path / "shards")
    (out / "train-00000.safetensors").unlink()
    with pytest.raises(UserError, match="missing.*preprocess"):
        load_split(out, "train")


# --- the split ----------------------------------------------------------------------------------


def _membership(manifest: dict) -> dict[str, set[tuple[str, int]]]:
    return {
        split: {_class_and_numbered_frame(name) for name in split_files(manifest, split)}
        for split in ("train", "val")
    }


def _val_frames_with_train_neighbour(manifest: dict) -> list[tuple[str, int]]:
    sides = _membership(manifest)
    return sorted(
        (c, n) for c, n in sides["val"] if (c, n - 1) in sides["train"] or (c, n + 1) in sides["train"]
    )


def test_block_split_keeps_neighbouring_frames_on_one_side(built: tuple[Path, dict]) -> None:
    manifest = built[1]
    assert _val_frames_with_train_neighbour(manifest) == []
    for name in CLASSES:
        assert (
            manifest["splits"]["train"]["per_class"][name] > 0
            and manifest["splits"]["val"]["per_class"][name] > 0
        ), name
    assert not (_membership(manifest)["train"] & _membership(manifest)["val"])


def test_random_split_does_leak_neighbours(raw: Path, tmp_path: Path) -> None:
    manifest = build(raw, tmp_path / "shards", replace(CFG, split="random"))
    leaky = _val_frames_with_train_neighbour(manifest)
    assert len(leaky) > manifest["splits"]["val"]["count"] // 2, "the contrast the block split exists for"
    assert manifest["dropped_for_gap"] == 0
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 29 * PER_CLASS


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("n", "block_size", "gap"), [(100, 10, 1), (95, 10, 2), (37, 4, 0), (300, 50, 3)])
def test_block_split_unit(n: int, block_size: int, gap: int, seed: int) -> None:
    split = block_split(n, 0.2, block_size, gap, np.random.default_rng(seed))
    train, val, dropped = set(split.train), set(split.val), set(split.dropped)

    assert train | val | dropped == set(range(n)) and len(train) + len(val) + len(dropped) == n, "a partition"
    blocks = {i // block_size for i in val}
    assert val == {i for i in range(n) if i // block_size in blocks}, "validation takes whole blocks"
    n_blocks = -(-n // block_size)
    assert len(blocks) == max(1, round(0.2 * n_blocks))
    assert abs(len(val) / n - 0.2) <= block_size / n, "val fraction honoured to within a block"
    assert dropped == {i for i in range(n) if i not in val and any(abs(i - v) <= gap for v in val)}, (
        "exactly the gap"
    )
    assert all(abs(t - v) > gap for t in train for v in val)
    assert split == block_split(n, 0.2, block_size, gap, np.random.default_rng(seed)), (
        "deterministic per seed"
    )


def test_block_split_refuses_what_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="one block"):
        block_split(8, 0.2, 10, 1, np.random.default_rng(0))
    # 6 frames in blocks of 5: if the full block goes to validation, the gap eats the one frame left.
    for seed in range(20):
        try:
            split = block_split(6, 0.2, 5, 1, np.random.default_rng(seed))
        except ValueError as err:
            assert "no training frame" in str(err)
        else:
            assert split.train and split.val


def test_block_split_too_coarse_is_a_user_error(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="block_size"):
        build(raw, tmp_path / "shards", replace(CFG, block_size=20))  # 20 frames = one block per class
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_random_split_unit() -> None:
    split = random_split(50, 0.2, np.random.default_rng(0))
    assert len(split.val) == 10 and sorted(split.train + split.val) == list(range(50)) and split.dropped == []


def test_max_images_is_a_stratified_cap(raw: Path, tmp_path: Path) -> None:
    cap = 300  # of 580: about 10 per class
    manifest = build(raw, tmp_path / "shards", replace(CFG, max_images=cap, block_size=2))
    used = (
        manifest["splits"]["train"]["count"]
        + manifest["splits"]["val"]["count"]
        + manifest["dropped_for_gap"]
    )
    assert cap - len(CLASSES) < used <= cap
    for name in CLASSES:
        assert (
            manifest["splits"]["train"]["per_class"][name] > 0
            and manifest["splits"]["val"]["per_class"][name] > 0
        ), name
    frames = [
        _class_and_numbered_frame(f)[1] for split in ("train", "val") for f in split_files(manifest, split)
    ]
    assert max(frames) > 15, "a sample across the frames, not the first ones"
    assert manifest["splits"]["test"]["count"] == 28, "the cap applies to the training folder only"


# --- bad and unusual files ----------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _add_odd_files(root: Path) -> tuple[dict[str, bytes], dict[str, tuple[int, int, int]]]:
    """Unreadable files (to be skipped) and readable odd modes (to be converted) with their colour."""
    real = (root / TRAIN_DIR / "A" / "A1.jpg").read_bytes()
    bad = {
        "A/A1001.jpg": b"",
        "A/A1002.jpg": b"this is a text file, not a JPEG\n" * 4,
        "C/C1003.jpg": real[: len(real) // 2],
    }
    odd = {
        "B/B1001.png": (Image.new("L", (60, 50), 128), "PNG", (128, 128, 128)),
        "B/B1002.png": (Image.new("RGB", (48, 48), (0, 204, 0)).convert("P"), "PNG", (0, 204, 0)),
        "B/B1003.png": (Image.new("RGBA", (48, 48), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        "B/B1004.png": (
            Image.new("RGBA", (48, 48), (0, 0, 0, 0)),
            "PNG",
            (255, 255, 255),
        ),  # transparent -> white
        "B/B1005.jpg": (Image.new("RGB", (64, 64), (255, 0, 0)).convert("CMYK"), "JPEG", (255, 0, 0)),
        "B/B1006.jpg": (Image.new("L", (64, 64), 60), "JPEG", (60, 60, 60)),
    }
    for name, data in bad.items():
        (root / TRAIN_DIR / name).write_bytes(data)
    for name, (image, fmt, _) in odd.items():
        (root / TRAIN_DIR / name).write_bytes(_encoded(image, fmt))
    return bad, {name: colour for name, (_, _, colour) in odd.items()}


def test_unreadable_files_are_skipped_and_odd_modes_converted(raw: Path, tmp_path: Path) -> None:
    root = _copy_raw(raw, tmp_path / "raw")
    bad, odd = _add_odd_files(root)
    manifest = build(root, tmp_path / "shards", replace(CFG, block_gap=0))  # no gap: every odd file is used

    skipped = {Path(s["file"]).relative_to(TRAIN_DIR).as_posix(): s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(bad)
    assert all(reason.strip() and "\n" not in reason for reason in skipped.values())
    assert "truncated" in skipped["C/C1003.jpg"]
    total = sum(m["count"] for m in manifest["splits"].values()) + manifest["dropped_for_gap"] + len(skipped)
    assert manifest["dropped_for_gap"] == 0
    assert total == 29 * PER_CLASS + 28 + len(bad) + len(odd), "every file is either used or skipped"

    rows = {}
    for split in ("train", "val"):
        images, labels = load_split(tmp_path / "shards", split)
        for row, name in enumerate(split_files(manifest, split)):
            rows[Path(name).relative_to(TRAIN_DIR).as_posix()] = (images[row], labels[row])
    for name, colour in odd.items():
        image, label = rows[name]
        assert CLASSES[int(label)] == "B"
        pixels = _denormalize(image)
        assert np.abs(pixels - np.asarray(colour)).max() < 12, (
            f"{name}: {pixels.reshape(-1, 3).mean(0)} != {colour}"
        )


def test_an_image_bomb_is_skipped_not_decoded(raw: Path, tmp_path: Path) -> None:
    """A PNG of a few KB that declares far more pixels than data.max_image_pixels is refused from its
    header: skipped and reported like an unreadable file, never decoded."""
    root = _copy_raw(raw, tmp_path / "raw")
    bomb = Image.new("L", (4000, 3000))  # 12 M pixels of zeros: a few KB as PNG
    bomb.save(root / TRAIN_DIR / "D" / "D999.png", optimize=True)
    assert (root / TRAIN_DIR / "D" / "D999.png").stat().st_size < 100_000
    manifest = build(root, tmp_path / "shards", replace(CFG, block_gap=0, max_image_pixels=1_000_000))

    [skipped] = [s for s in manifest["skipped"] if s["file"].endswith("D999.png")]
    assert "4000x3000 pixels is over the limit of 1000000" in skipped["reason"]
    assert all(not name.endswith("D999.png") for shard in manifest["shards"] for name in shard["files"])


def test_an_empty_class_is_warned_about_and_a_class_of_one_refused(raw: Path, tmp_path: Path, capsys) -> None:
    root = _copy_raw(raw, tmp_path / "raw")
    for image in (root / TRAIN_DIR / "Q").iterdir():
        image.unlink()
    manifest = build(root, tmp_path / "shards")
    assert "no training images for class(es) Q" in capsys.readouterr().err
    assert manifest["empty_classes"] == ["Q"] and manifest["splits"]["train"]["per_class"]["Q"] == 0

    first, *rest = sorted((root / TRAIN_DIR / "R").iterdir())
    for image in rest:
        image.unlink()
    with pytest.raises(UserError, match="class R has only 1 image: too few to split"):
        build(root, tmp_path / "shards2")


def test_too_many_unreadable_files_fail_without_a_manifest(raw: Path, tmp_path: Path) -> None:
    root = _copy_raw(raw, tmp_path / "raw")
    out = tmp_path / "shards"
    build(root, out)  # a good earlier run: its manifest must not survive a failed rebuild
    _add_odd_files(root)
    with pytest.raises(UserError, match=r"3 of \d+ images could not be read.*max_skipped_fraction") as info:
        build(root, out, replace(CFG, max_skipped_fraction=0.004))  # 3 of 614 is 0.0049
    assert "\n" not in str(info.value)
    assert not (out / "manifest.json").exists()


# --- determinism and atomicity ------------------------------------------------------------------


def test_parallel_output_equals_serial_output(raw: Path, tmp_path: Path) -> None:
    serial = build(raw, tmp_path / "serial", replace(CFG, workers=1))
    parallel = build(raw, tmp_path / "parallel", replace(CFG, workers=2))

    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]
    for shard in serial["shards"]:
        assert (tmp_path / "serial" / shard["file"]).read_bytes() == (
            tmp_path / "parallel" / shard["file"]
        ).read_bytes()
    assert {k: v for k, v in serial.items() if k != "params"} == {
        k: v for k, v in parallel.items() if k != "params"
    }


def _leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp" in name] if folder.exists() else []


def _shards_made_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's shards made by one thread of this process, where what a test patches applies
    (worker processes import modules of their own)."""
    monkeypatch.setattr(preprocess, "process_pool", lambda workers, preload: ThreadPoolExecutor(1))


def test_failure_mid_run_leaves_no_manifest_and_no_temp_files(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "shards"
    build(raw, out)
    _shards_made_in_this_process(monkeypatch)
    real_write, calls = preprocess.write_shard, []

    def failing_write(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, images, labels)

    monkeypatch.setattr(preprocess, "write_shard", failing_write)
    with pytest.raises(OSError, match="No space left"):
        build(raw, out)
    assert calls[:2] == ["train-00000.safetensors", "train-00001.safetensors"]
    assert not (out / "train-00001.safetensors").exists()
    assert not (out / "manifest.json").exists(), "the stale manifest of the earlier run is gone too"
    assert _leftovers(out) == []


def test_failure_inside_a_shard_write_removes_the_temp_file(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second shard, after its bytes are written to the temp file
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", failing_fsync)
    _shards_made_in_this_process(monkeypatch)
    out = tmp_path / "shards"
    with pytest.raises(OSError, match="Input/output"):
        build(raw, out)
    assert len(calls) >= 2  # the thread may start the next shard before the stage stops it
    assert _leftovers(out) == [] and not (out / "manifest.json").exists()
    assert "train-00000.safetensors" in os.listdir(out), "the shard finished before the failure stays"
    assert "train-00001.safetensors" not in os.listdir(out), "the shard whose write failed is not there"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["manifest.json"]


# --- the stage and its MLflow run ---------------------------------------------------------------


def _workspace(raw: Path, tmp_path: Path) -> Paths:
    paths = Paths(tmp_path / "ws")
    paths.raw.parent.mkdir(parents=True)
    paths.raw.symlink_to(raw, target_is_directory=True)
    return paths


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for this module's runs (each test uses its own experiment): the schema
    migration of a fresh store takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


def test_run_preprocess_logs_an_mlflow_run(
    raw: Path, tmp_path: Path, mlflow_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import git_commit

    uri = f"sqlite:///{mlflow_dir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # whatever MLflow writes must not land in the directory the stage runs in
    paths = _workspace(raw, tmp_path)
    params = params_from_dict(
        {"seed": 3, "data": {**asdict(CFG), "synthetic": {}}, "mlflow": {"experiment": "preprocess-test"}}
    )

    manifest = run_preprocess(params, paths)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("preprocess-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])

    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "preprocess"
    assert run.data.tags["git_commit"] == git_commit()
    assert run.data.params["seed"] == "3" and run.data.params["data.image_size"] == "32"
    assert run.data.params["data.split"] == "block" and run.data.params["data.block_size"] == "5"
    metrics = run.data.metrics
    assert metrics["train_images"] == manifest["splits"]["train"]["count"] > 0
    assert metrics["val_images"] == manifest["splits"]["val"]["count"] > 0
    assert metrics["test_images"] == 28
    assert metrics["skipped_files"] == 0
    assert metrics["dropped_for_gap"] == manifest["dropped_for_gap"]
    assert metrics["images_per_second"] > 0

    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["manifest.json"]
    local = Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path / "download")))
    assert local.read_bytes() == paths.manifest.read_bytes()
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_dir.is_relative_to(mlflow_dir), "artifacts live beside the user's sqlite store"
    assert os.listdir(cwd) == [], "nothing written to the working directory (no ./mlruns, no ./mlartifacts)"


def test_run_preprocess_failure_marks_the_run_failed(
    tmp_path: Path, mlflow_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{mlflow_dir}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = params_from_dict({"mlflow": {"experiment": "preprocess-fail"}})
    with pytest.raises(UserError, match="fetch"):
        run_preprocess(params, Paths(tmp_path / "ws"))  # no data/raw at all
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("preprocess-fail")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["stage"] == "preprocess"


# --- the decoding processes ---------------------------------------------------------------------

_POOL_SCRIPT = """
import time
from pipeline.workers import process_pool
if __name__ == "__main__":
    pool = process_pool(2, preload=["time"])
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    time.sleep(1)  # both workers are busy now
    print("ready", flush=True)
    time.sleep(120)
"""


def test_workers_end_when_the_stage_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed stage runs no cleanup: its decoding processes must still go, not block forever."""
    import psutil

    script = tmp_path / "stage.py"
    script.write_text(_POOL_SCRIPT)
    stage = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert stage.stdout is not None
    try:
        assert stage.stdout.readline().strip() == "ready"
        descendants = psutil.Process(stage.pid).children(recursive=True)
        assert len(descendants) >= 3, "a fork server and two workers"
        stage.kill()
        stage.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    finally:
        stage.kill()


# --- the external test set ----------------------------------------------------------------------


def test_external_images_become_their_own_split(raw: Path, tmp_path: Path) -> None:
    from pipeline.synthetic import generate_external_set

    external = tmp_path / "external"
    generate_external_set(external, images_per_class=2, seed=0, size=64, workers=2)
    (external / "source.json").write_text("{}")  # fetch's note: not an image, never read as one
    manifest = build_shards(
        CFG, 0, raw, raw / TRAIN_DIR, raw / TEST_DIR, tmp_path / "shards", external_dir=external
    )
    info = manifest["splits"]["external"]
    assert info["count"] == 58 and set(info["per_class"].values()) == {2}
    names = split_files(manifest, "external")
    assert names[:2] == ["A/A_external1.jpg", "A/A_external2.jpg"], "named relative to the external folder"
    images, labels = load_split(tmp_path / "shards", "external", manifest)
    assert labels.tolist() == [CLASSES.index(Path(name).parent.name) for name in names]
    pixels = decode_image(external / names[5], 32).astype(np.float32)
    assert np.abs(_denormalize(images[5]) - pixels).max() < 1.0, "the same decoding as every other split"
    train = build(raw, tmp_path / "without")
    assert manifest["splits"]["train"] == train["splits"]["train"], "the external set changes no other split"
    assert train["splits"]["external"]["count"] == 0
