"""GPU code paths: DataParallel over every visible GPU with bf16 in every replica, channels_last and
the data on the device; batches from the host (memory-mapped, streamed) intact on the GPU; steps that
never wait for the GPU; DDP over NCCL started by torchrun, whose
ranks end with identical weights and buffers; what dp refuses; asking for more GPUs than there are.

Skipped, with the reason, where no GPU is visible. On a lent GPU machine:
    python -m pytest -m gpu -rs -v            (or: bash benchmarks/gpu_check.sh)
Every subprocess here has a timeout (at most 150 s) shorter than gpu_check.sh's limit on the whole
pytest part, so a hang fails its own test with the subprocess's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "benchmarks" / "gpu_train_probe.py"
SUBPROCESS_TIMEOUT = 150

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU visible"),
]


def _params(gpus: int, **train):
    from pipeline.config import params_from_dict

    values = {
        "gpus": gpus,
        "model": {"name": "resnet18"},
        "train": {
            "epochs": 6,
            "batch_size": 32,
            "channels_last": True,
            "bf16": True,
            "data_on_device": True,
            **train,
        },
    }
    return params_from_dict(values)


def _run(command: list[str], log: Path, timeout: int = SUBPROCESS_TIMEOUT) -> str:
    """Run `command` with its output in `log` (not a pipe nobody reads); on a timeout, kill its whole
    process group (torchrun's ranks too) and fail with the output so far."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"timed out after {timeout}s: {' '.join(command)}\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def _learnable_data(count: int = 128):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 29, (count,), generator=generator)
    patterns = torch.randn(29, 3, 64, 64, generator=generator)  # one per class: learnable in a few steps
    images = (patterns[labels] + 0.5 * torch.randn(count, 3, 64, 64, generator=generator)).half()
    return images, labels


def _dp_training(gpus: int, images: int = 128):
    from pipeline.strategy import DataParallelStrategy
    from pipeline.trainer import TrainingState, step_settings

    params = _params(gpus)
    strategy = DataParallelStrategy(gpus)
    images, labels = (tensor.to(strategy.device) for tensor in _learnable_data(images))
    torch.manual_seed(0)
    state = TrainingState(params, strategy, 29, steps_per_epoch=4)
    return params, strategy, state, step_settings(params, strategy), images, labels


def _epoch_batches(images: torch.Tensor, labels: torch.Tensor, batch: int, epoch: int, settings):
    """One epoch's batches as pipeline.feed makes them for a split held on the GPU."""
    from pipeline.batches import epoch_order, rank_batches
    from pipeline.feed import tensor_batches

    steps = rank_batches(epoch_order([len(labels)], 4096, 0, epoch).order, batch, 1, 0)
    return tensor_batches(images, labels, list(steps), settings)


def test_dp_over_all_visible_gpus_trains_with_bf16_in_every_replica_channels_last_and_data_on_device():
    from pipeline.loop import train_one_epoch

    gpus = torch.cuda.device_count()
    params, strategy, state, settings, images, labels = _dp_training(gpus)
    assert images.device.type == "cuda" and labels.device.type == "cuda", (
        "data_on_device: the split should sit on the GPU"
    )
    assert settings.bf16 and settings.channels_last
    if gpus > 1:
        assert isinstance(state.model, nn.DataParallel) and state.model.device_ids == list(range(gpus))
    seen: list[tuple[torch.device, torch.dtype, bool]] = []
    # DataParallel's replicas share the bare module's hooks: this runs in every replica's thread.
    state.bare.conv1.register_forward_hook(
        lambda module, inputs, output: seen.append(
            (output.device, output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    before = {k: v.detach().clone() for k, v in state.bare.state_dict().items()}

    losses = []
    for epoch in range(params.train.epochs):
        batches = _epoch_batches(images, labels, 32, epoch, settings)
        stats = train_one_epoch(
            state.model, state.optimizer, state.scheduler, nn.CrossEntropyLoss(), batches, strategy, settings
        )
        losses.append(stats.loss)
        assert stats.images == 128 and torch.isfinite(torch.tensor(stats.loss))

    assert {device.index for device, _, _ in seen} == set(range(gpus)), "every GPU should have run a replica"
    dtypes = {(str(device), str(dtype)) for device, dtype, _ in seen}
    assert all(dtype == torch.bfloat16 for _, dtype, _ in seen), (
        f"every replica should compute in bf16: {sorted(dtypes)}"
    )
    assert all(channels_last for _, _, channels_last in seen)
    assert all(p.is_cuda for p in state.bare.parameters())
    changed = [
        k
        for k, v in state.bare.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert changed, "training changed no weight"
    assert losses[-1] < losses[0], f"128 fixed images should be learnt a little in a few epochs: {losses}"


def test_dataparallel_threads_run_the_replica_in_bf16_even_on_one_gpu():
    """DataParallel's own threading code (parallel_apply), two replicas per GPU: each thread re-enters
    autocast with CUDA's default dtype, float16, unless the replica enters bf16 itself."""
    from torch.nn.parallel import parallel_apply

    from pipeline.serving.networks import build_model
    from pipeline.strategy import AutocastForward

    gpus = torch.cuda.device_count()
    devices = [index for index in range(gpus) for _ in range(2)]
    model = build_model("resnet18", 29).cuda().eval()
    seen: list[torch.dtype] = []
    first_conv = model.get_submodule("conv1")
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    replica = AutocastForward(model, torch.device("cuda"), "bf16")
    inputs = [(torch.randn(4, 3, 64, 64, device="cuda"),) for _ in devices]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        parallel_apply([replica] * len(devices), inputs, devices=devices)
    assert len(seen) == len(devices) and set(seen) == {torch.bfloat16}, seen


def test_training_steps_never_wait_for_the_gpu():
    """After a warm-up epoch, an epoch runs under set_sync_debug_mode("error"): a host-device sync in
    any step (an .item(), a tensor made from host data) raises. The epoch's end is its one intended sync.
    The epoch is long enough for the NaN check to copy and read its flag (NAN_CHECK_INTERVAL)."""
    from pipeline.loop import NAN_CHECK_INTERVAL, train_one_epoch

    gpus = torch.cuda.device_count()
    batch = 2 * gpus
    steps = 2 * NAN_CHECK_INTERVAL + 5
    _, strategy, state, settings, images, labels = _dp_training(gpus, images=steps * batch)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(2):
        batches = _epoch_batches(images, labels, batch, epoch, settings)
        torch.cuda.set_sync_debug_mode("error" if epoch else 0)
        try:
            train_one_epoch(
                state.model, state.optimizer, state.scheduler, loss_fn, batches, strategy, settings
            )
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("budget", [None, 0.0012], ids=["memory-mapped", "streamed"])
def test_batches_from_the_host_arrive_on_the_gpu_as_they_left(tmp_path, budget):
    """Pinned, gathered in a thread and copied on a side stream: every batch equals the split's rows."""
    from pipeline.config import params_from_dict
    from pipeline.feed import open_training_data
    from pipeline.fetch import fetch_raw
    from pipeline.paths import Paths
    from pipeline.preprocess import shard_workspace
    from pipeline.shards import load_split, read_manifest
    from pipeline.strategy import DataParallelStrategy
    from pipeline.trainer import step_settings

    from conftest import TINY_PARAMS, deep_merge

    train = {"data_on_device": False, "memory_budget_gb": budget, "shuffle_buffer": 50}
    params = params_from_dict(
        deep_merge(TINY_PARAMS, {"gpus": 1, "data": {"shard_size": 40}, "train": train})
    )
    paths = Paths(tmp_path)
    fetch_raw(params, paths)
    shard_workspace(params, paths)
    strategy = DataParallelStrategy(1)
    settings = step_settings(params, strategy)
    data = open_training_data(params, paths.shards, read_manifest(paths.shards), strategy, settings)
    assert data.mode == ("mapped" if budget is None else "streamed")
    images, labels = load_split(paths.shards, "train")
    by_content = {img.numpy().tobytes(): i for i, img in enumerate(images)}
    seen = []
    for x, y in data.train_batches(0):
        torch.cuda.current_stream().synchronize()
        assert x.is_cuda and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        rows = [by_content[row.half().cpu().contiguous().numpy().tobytes()] for row in x]
        assert torch.equal(y.cpu(), labels[rows])
        seen += rows
    assert len(seen) == len(set(seen)) == data.steps_per_epoch * params.train.batch_size


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("probe") / "data"
    _run(
        [sys.executable, str(PROBE), "--prepare", str(data), "--images-per-class", "16", "--size", "64"],
        data.parent / "prepare.log",
        timeout=90,
    )
    return data


def _ddp_probe(data: Path, out: Path, *options: str) -> dict:
    gpus = torch.cuda.device_count()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", str(PROBE),
        "--strategy", "ddp", "--data", str(data), "--epochs", "2", "--batch-size", str(16 * gpus),
        "--json", str(out / "ddp.json"), *options,
    ]  # fmt: skip
    _run(command, out / "ddp.log")
    return json.loads((out / "ddp.json").read_text())


def test_ddp_steps_never_wait_for_the_gpu(probe_data, tmp_path):
    summary = _ddp_probe(probe_data, tmp_path, "--sync-debug", "--min-steps", "45")
    assert summary["sync_debug"] and summary["steps_per_epoch"] >= 45, (
        "the second epoch ran under set_sync_debug_mode('error')"
    )


def test_ddp_over_nccl_ends_with_identical_weights_and_buffers_on_every_rank(probe_data, tmp_path):
    gpus = torch.cuda.device_count()
    weights = tmp_path / "weights"
    summary = _ddp_probe(probe_data, tmp_path, "--save-weights", str(weights))
    assert (
        summary["backend"] == "nccl"
        and summary["processes"] == gpus
        and summary["bf16"]
        and summary["data_on_device"]
    )
    assert {dtype for _, dtype in summary["compute_dtypes"]} == {"bfloat16"}, summary["compute_dtypes"]
    states = [
        torch.load(weights / f"rank{rank}.pt", weights_only=True, map_location="cpu") for rank in range(gpus)
    ]
    assert all(s["world_size"] == gpus for s in states)
    # Buffers too: before evaluating, every rank takes rank 0's batch-norm statistics.
    names = list(states[0]["state"])
    assert len(names) > 10 and any("running_mean" in name for name in names)
    for other in states[1:]:
        for name in names:
            assert torch.equal(states[0]["state"][name], other["state"][name]), (
                f"rank {other['rank']} differs from rank 0 in {name}"
            )
    assert summary["ranks_agree"]


def test_dp_refuses_what_it_cannot_honour():
    from pipeline.errors import UserError
    from pipeline.strategy import make_strategy

    gpus = torch.cuda.device_count()
    with pytest.raises(UserError, match="SyncBatchNorm needs a process group"):
        make_strategy("dp", gpus, sync_batchnorm=True)
    if gpus > 1:
        with pytest.raises(UserError, match=rf"train.compile does not reach DataParallel's {gpus} replicas"):
            make_strategy("dp", gpus, compile_=True)
    else:
        make_strategy(
            "dp", 1, compile_=True
        )  # one GPU: no replicas, the compiled module is the one that runs


def test_asking_for_more_gpus_than_visible_names_how_many_there_are():
    from pipeline.errors import UserError
    from pipeline.strategy import check_visible_gpus, make_strategy

    visible = torch.cuda.device_count()
    check_visible_gpus(visible)  # exactly as many is fine
    with pytest.raises(
        UserError, match=rf"gpus={visible + 1} but only {visible} CUDA device\(s\) are visible"
    ):
        check_visible_gpus(visible + 1)
    with pytest.raises(UserError, match=rf"only {visible} CUDA device"):
        make_strategy("dp", visible + 1)


def test_augmentation_on_the_gpu_matches_the_cpu():
    """Drawn on the CPU, applied where the batch lives: the same images whatever the device."""
    from pipeline.augment import BatchAugment
    from pipeline.config import AugmentConfig
    from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD

    steps = torch.randperm(64, generator=torch.Generator().manual_seed(1)).numpy().reshape(2, 32)
    augment = BatchAugment(AugmentConfig(), 0, 64, IMAGENET_MEAN, IMAGENET_STD).for_epoch(3, steps)
    assert augment is not None  # augmentation is on by default
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last
    )
    on_cpu = augment(images, 1)
    on_gpu = augment(images.cuda(), 1)
    assert on_gpu.device.type == "cuda" and on_gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-3)
