"""The data path on the tiny profile: memory-mapped shards checked once per machine, the epoch's
order and each rank's share, streaming past a memory budget, and the prefetching thread."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

import pipeline.shards as shards_module
from pipeline.batches import epoch_order, eval_chunks, rank_batches, stream_plan
from pipeline.config import params_from_dict
from pipeline.errors import UserError
from pipeline.feed import TrainingData, open_training_data
from pipeline.loop import StepSettings, evaluate, train_one_epoch
from pipeline.paths import Paths
from pipeline.prefetch import Prefetched
from pipeline.preprocess import build_shards
from pipeline.shards import (
    checks_dir,
    image_bytes,
    images_offset,
    load_split,
    open_split,
    read_images,
    read_manifest,
    split_shards,
    write_shard,
)
from pipeline.strategy import Strategy
from pipeline.streaming import stream_bound_images
from pipeline.trainer import TrainingState, step_settings

from conftest import TINY_PARAMS, deep_merge

SHARD_SIZE = 40  # several shards per split, one of them short
CPU = torch.device("cpu")


def _params(**train):
    return params_from_dict(
        deep_merge(
            TINY_PARAMS, {"data": {"shard_size": SHARD_SIZE}, "train": {"shuffle_buffer": 50, **train}}
        )
    )


def _age(folder: Path) -> None:
    """Files written an hour ago: a check of a file modified just now is not remembered (see shards.py)."""
    old = time.time_ns() - 3600 * 10**9
    for path in folder.iterdir():
        os.utime(path, ns=(old, old))


@pytest.fixture(scope="module")
def shards(tiny_data: Path, tmp_path_factory) -> Path:
    paths, params = Paths(tiny_data), _params()
    out = tmp_path_factory.mktemp("feed") / "shards"
    build_shards(params.data, params.seed, paths.raw, paths.raw_train, paths.raw_test, out)
    _age(out)
    return out


def _rank(rank: int, world_size: int) -> Strategy:
    strategy = Strategy(CPU)
    strategy.rank, strategy.world_size = rank, world_size
    return strategy


def _data(shards: Path, strategy: Strategy | None = None, **train) -> TrainingData:
    params = _params(**train)
    strategy = strategy or Strategy(CPU)
    return open_training_data(
        params, shards, read_manifest(shards), strategy, step_settings(params, strategy)
    )


# Below the tiny splits' 2.1 MB, above what streaming them holds.
STREAM: dict[str, Any] = {"memory_budget_gb": 0.0012}


# --- memory-mapped shards, checked once ----------------------------------------------------------


def test_open_split_maps_the_shards_and_returns_what_was_written(shards: Path) -> None:
    manifest = read_manifest(shards)
    files = [shards / shard["file"] for shard in split_shards(manifest, "train")]
    assert len(files) >= 3
    split = open_split(shards, "train", manifest)
    written = [load_file(str(path)) for path in files]
    images = torch.from_numpy(np.concatenate([w["images"] for w in written]))
    assert torch.equal(split.gather(torch.arange(len(split))), images)
    assert torch.equal(split.labels, torch.from_numpy(np.concatenate([w["labels"] for w in written])))
    picked = torch.tensor([0, 5, SHARD_SIZE - 1, SHARD_SIZE, 2 * SHARD_SIZE + 3, len(split) - 1])
    assert torch.equal(split.gather(picked), images[picked])
    assert torch.equal(load_split(shards, "train", manifest)[0], images), "the concatenating loader agrees"

    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if ".safetensors" in line
    }
    assert {str(path) for path in files} <= mapped, (
        "the shards are memory-mapped, not read into private memory"
    )


def test_a_good_shard_is_hashed_once_and_a_corrupt_one_refused_every_time(
    shards: Path, tmp_path: Path, monkeypatch
) -> None:
    out = shutil.copytree(shards, tmp_path / "data" / "shards")
    _age(out)
    hashed: list[str] = []
    real_sha256 = shards_module.sha256_of

    def counted_sha256(path):
        hashed.append(Path(path).name)
        return real_sha256(path)

    monkeypatch.setattr(shards_module, "sha256_of", counted_sha256)
    manifest = read_manifest(out)
    train_files = [shard["file"] for shard in split_shards(manifest, "train")]

    open_split(out, "train", manifest)
    assert sorted(hashed) == sorted(train_files)
    hashed.clear()
    open_split(out, "train", manifest)
    assert hashed == [], "checked once: later loads only compare size, mtime and inode with the record"
    assert sorted(os.listdir(out)) == sorted(["manifest.json", *(s["file"] for s in manifest["shards"])]), (
        "nothing written into the DVC output"
    )
    assert sorted(p.name for p in checks_dir(out).iterdir()) == sorted(f"{name}.json" for name in train_files)

    victim = out / train_files[1]
    before = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size, and the old mtime put back
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    for attempt in range(2):
        with pytest.raises(UserError, match="corrupt.*sha256") as info:
            open_split(out, "train", manifest)
        assert victim.name in str(info.value) and "\n" not in str(info.value), attempt


def test_a_shard_corrupt_from_the_start_is_never_recorded(shards: Path, tmp_path: Path) -> None:
    out = shutil.copytree(shards, tmp_path / "shards")
    victim = out / split_shards(read_manifest(out), "val")[0]["file"]
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    _age(out)
    for _ in range(2):
        with pytest.raises(UserError, match="corrupt"):
            _data(out)
    assert not (checks_dir(out) / f"{victim.name}.json").exists()


def test_streaming_reads_any_rows_into_any_slots_exactly_and_refuses_a_short_file(
    shards: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(shards)
    shard = split_shards(manifest, "train")[0]
    images = load_split(shards, "train", {**manifest, "shards": [shard]})[0]
    rows = np.array([0, 1, 2, 7, 9, 10, shard["count"] - 1])  # runs of consecutive rows, and single ones
    slots = np.array([6, 0, 3, 1, 5, 2, 4])
    into = torch.zeros((len(rows), *images.shape[1:]), dtype=torch.float16)

    path = shards / shard["file"]
    read_images(path, images_offset(path), rows, into.numpy().view(np.uint8).reshape(len(rows), -1), slots)

    expected = torch.empty_like(into)
    expected[torch.from_numpy(slots)] = images[torch.from_numpy(rows)]
    assert torch.equal(into, expected)

    short = tmp_path / shard["file"]
    short.write_bytes(path.read_bytes()[: -images[0].numel()])  # half the last image (labels come first)
    with pytest.raises(UserError, match="truncated.*dvc repro -f preprocess") as info:
        read_images(
            short, images_offset(short), rows, into.numpy().view(np.uint8).reshape(len(rows), -1), slots
        )
    assert short.name in str(info.value)


def test_a_run_of_rows_longer_than_one_preadv_call_is_read_whole(tmp_path: Path) -> None:
    """More consecutive rows than one preadv call takes buffers for: read in pieces, each at its row."""
    count = 2 * shards_module._IOV_MAX + 5
    images = np.random.default_rng(0).standard_normal((count, 3, 2, 2)).astype(np.float16)
    path = tmp_path / "train-00000.safetensors"
    write_shard(path, images, np.zeros(count, dtype=np.int64))
    rows = np.arange(1, count)  # one run, starting past the first row
    slots = rows[::-1] - 1  # written back to front
    into = np.zeros((count - 1, images[0].nbytes), dtype=np.uint8)

    read_images(path, images_offset(path), rows, into, slots)

    assert np.array_equal(into.view(np.float16).reshape(-1, 3, 2, 2), images[1:][::-1])


# --- the order --------------------------------------------------------------------------------------


def test_the_epoch_order_is_a_seeded_stream_shuffle() -> None:
    counts, buffer = [40, 40, 40, 17], 25
    first = epoch_order(counts, buffer, seed=3, epoch=1)
    again = epoch_order(counts, buffer, seed=3, epoch=1)
    assert np.array_equal(first.order, again.order), "same params, same order"
    assert not np.array_equal(first.order, epoch_order(counts, buffer, seed=3, epoch=2).order)
    assert sorted(first.order.tolist()) == list(range(sum(counts)))
    starts = np.concatenate([[0], np.cumsum(counts)])
    stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in first.shard_order])
    fill_position = np.argsort(stream)
    # The image trained on t-th was among the first buffer + t of the stream: what a buffer can hold.
    assert all(fill_position[image] <= buffer - 1 + t for t, image in enumerate(first.order))
    whole = epoch_order(counts, 10_000, seed=3, epoch=1).order
    assert sorted(whole.tolist()) == list(range(sum(counts))) and not np.array_equal(whole, np.sort(whole))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_share_each_global_batch_disjointly(world_size: int) -> None:
    order = epoch_order([40, 40, 17], 30, seed=0, epoch=0).order
    shares = [rank_batches(order, 32, world_size, rank) for rank in range(world_size)]
    steps = len(order) // 32
    for step in range(steps):
        parts = [set(share[step].tolist()) for share in shares]
        assert sum(map(len, parts)) == 32 and set().union(*parts) == set(
            order[step * 32 : (step + 1) * 32].tolist()
        )
    trained = np.concatenate([share.ravel() for share in shares])
    assert len(set(trained.tolist())) == len(trained) == steps * 32
    assert set(order.tolist()) - set(trained.tolist()) == set(order[steps * 32 :].tolist()), (
        "only the tail, under one batch"
    )


def test_eval_chunks_cover_every_image_once_shard_by_shard() -> None:
    offsets = [0, 40, 80, 97]
    seen = []
    for rank in range(3):
        for shard, index in eval_chunks(offsets, np.arange(rank, 97, 3), batch_size=8):
            assert offsets[shard] <= index.min() and index.max() < offsets[shard + 1] and len(index) <= 8
            seen += index.tolist()
    assert sorted(seen) == list(range(97))


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_stream_plan_holds_each_image_until_its_step_and_no_longer(world_size: int) -> None:
    counts, buffer, batch = [40, 40, 40, 40, 17], 30, 24
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    order = epoch_order(counts, buffer, seed=1, epoch=0)
    for rank in range(world_size):
        batches = rank_batches(order.order, batch, world_size, rank)
        plan = stream_plan(offsets, order.shard_order, batches, lookahead=1)
        held: dict[int, int] = {}
        read = 0
        for step, images in enumerate(batches):
            while read < len(plan.shard_order) and plan.load_step[read] <= step:
                for image, slot in zip(plan.rows[read].tolist(), plan.row_slots[read].tolist(), strict=True):
                    assert slot not in held, "a slot is reused only once its image was trained on"
                    held[slot] = image
                read += 1
            assert read > plan.need[step]
            assert [held.pop(slot) for slot in plan.batch_slots[step].tolist()] == images.tolist()
        assert not held, "every image read is trained on"
        assert plan.capacity * world_size <= buffer + batch + 2 * max(counts)


# --- training from each placement -------------------------------------------------------------------


def _train(data: TrainingData, params, epochs: int = 2) -> tuple[list[list[torch.Tensor]], dict, tuple]:
    strategy = Strategy(CPU)
    settings = step_settings(params, strategy)
    torch.manual_seed(0)
    state = TrainingState(params, strategy, 29, data.steps_per_epoch)
    seen = []
    for epoch in range(epochs):
        batches = list(data.train_batches(epoch))
        seen.append([y for _, y in batches] + [x for x, _ in batches])
        train_one_epoch(
            state.model, state.optimizer, state.scheduler, nn.CrossEntropyLoss(), batches, strategy, settings
        )
    return seen, state.bare.state_dict(), evaluate(state.eval_model, data.val_batches(), strategy, settings)


def test_streamed_and_memory_mapped_training_see_the_same_batches_and_end_with_the_same_weights(
    shards: Path,
) -> None:
    manifest = read_manifest(shards)
    assert (manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]) * image_bytes(
        32
    ) > STREAM["memory_budget_gb"] * 1e9
    mapped, streamed = _data(shards), _data(shards, **STREAM)
    assert (mapped.mode, streamed.mode) == ("mapped", "streamed")
    seen_mapped, weights_mapped, val_mapped = _train(mapped, _params())
    seen_streamed, weights_streamed, val_streamed = _train(streamed, _params(**STREAM))
    for epoch, (a, b) in enumerate(zip(seen_mapped, seen_streamed, strict=True)):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (
            f"epoch {epoch}: other batches"
        )
    assert not all(torch.equal(x, y) for x, y in zip(seen_mapped[0], seen_mapped[1], strict=True)), (
        "each epoch reshuffles"
    )
    for name, tensor in weights_mapped.items():
        assert torch.equal(tensor, weights_streamed[name]), name
    assert val_mapped == val_streamed


def _content_ids(shards: Path) -> dict[bytes, int]:
    split = open_split(shards, "train")
    images = split.gather(torch.arange(len(split)))
    ids = {hashlib.sha1(image.numpy().tobytes()).digest(): index for index, image in enumerate(images)}
    assert len(ids) == len(split), "the test needs distinct images"
    return ids


def test_streaming_ranks_see_disjoint_shares_that_together_are_the_epoch(shards: Path) -> None:
    ids = _content_ids(shards)
    params = _params(**STREAM)
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            data = _data(shards, _rank(rank, 2), **STREAM)
            assert data.mode == "streamed"
            images = [x for x, _ in data.train_batches(epoch)]
            per_rank.append(
                [
                    ids[hashlib.sha1(image.half().contiguous().numpy().tobytes()).digest()]
                    for batch in images
                    for image in batch
                ]
            )
            # Augmentation draws each image's changes by these indices: they must name the rows.
            assert per_rank[-1] == data.step_indices.reshape(-1).tolist()
        order = epoch_order(data.train_counts, params.train.shuffle_buffer, params.seed, epoch).order
        steps = len(order) // params.train.batch_size
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(per_rank[0]) == len(per_rank[1]) == steps * params.train.batch_size // 2
        assert set(per_rank[0]) | set(per_rank[1]) == set(order[: steps * params.train.batch_size].tolist())


def test_a_budget_too_small_even_to_stream_is_one_line_naming_the_params(shards: Path) -> None:
    params = _params(memory_budget_gb=0.0001)
    needed = stream_bound_images(params, read_manifest(shards)) * image_bytes(32)
    assert needed > 0.0001 * 1e9
    with pytest.raises(
        UserError,
        match="train.memory_budget_gb=0.0001 .* raise train.memory_budget_gb, or lower train.shuffle_buffer",
    ) as info:
        _data(shards, memory_budget_gb=0.0001)
    assert "\n" not in str(info.value)


# --- the prefetching thread --------------------------------------------------------------------------


def _threads() -> set[str]:
    return {thread.name for thread in threading.enumerate()} & {"batch-prefetch", "shard-reader"}


def test_an_error_while_gathering_reaches_the_step_and_stops_the_thread() -> None:
    settings = StepSettings(device=CPU, channels_last=False, bf16=False)

    def produce(step: int):
        if step == 3:
            raise ValueError("no such image")
        return torch.full((2, 3, 4, 4), float(step), dtype=torch.float16), torch.tensor([step, step])

    batches = Prefetched(produce, 10, settings)
    got = []
    with pytest.raises(ValueError, match="no such image"):
        for x, y in batches:
            assert x.dtype == torch.float32
            got.append(int(y[0]))
    assert got == [0, 1, 2] and not _threads()


def test_leaving_a_streamed_epoch_early_ends_its_threads(shards: Path) -> None:
    data = _data(shards, **STREAM)
    iterator = iter(data.train_batches(0))
    assert isinstance(iterator, Generator)  # so that it can be closed
    next(iterator)
    assert _threads() == {"batch-prefetch", "shard-reader"}
    iterator.close()
    assert not _threads()
