"""GPU code paths: DataParallel over every visible GPU with bf16, channels_last and the data on the
device; DDP over NCCL started by torchrun; asking for more GPUs than there are.

Skipped, with the reason, where no GPU is visible. On a lent GPU machine:
    python -m pytest -m gpu -rs            (or: bash benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "benchmarks" / "gpu_train_probe.py"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU visible")]


def _params(gpus: int, **train):
    from pipeline.config import params_from_dict

    values = {"gpus": gpus, "model": {"name": "resnet18"}, "train": {"epochs": 6, "batch_size": 32, "channels_last": True, "bf16": True, "data_on_device": True, **train}}
    return params_from_dict(values)


def test_dp_over_all_visible_gpus_trains_with_bf16_channels_last_and_data_on_device():
    from pipeline.loop import train_one_epoch
    from pipeline.strategy import DataParallelStrategy
    from pipeline.trainer import TrainingState, place_data, step_settings

    gpus = torch.cuda.device_count()
    params = _params(gpus)
    strategy = DataParallelStrategy(gpus)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 29, (128,), generator=generator)
    patterns = torch.randn(29, 3, 64, 64, generator=generator)  # one per class: learnable in a few steps
    images = (patterns[labels] + 0.5 * torch.randn(128, 3, 64, 64, generator=generator)).half()
    images, labels = place_data(images, labels, params, strategy.device)
    assert images.device.type == "cuda" and labels.device.type == "cuda", "data_on_device: the split should sit on the GPU"

    torch.manual_seed(0)
    state = TrainingState(params, strategy, 29, steps_per_epoch=4)
    settings = step_settings(params, strategy)
    assert settings.bf16 and settings.channels_last
    if gpus > 1:
        assert isinstance(state.model, nn.DataParallel) and state.model.device_ids == list(range(gpus))
    seen = {}
    state.bare.conv1.register_forward_hook(lambda module, inputs, output: seen.update(input=inputs[0], output=output))
    before = {k: v.detach().clone() for k, v in state.bare.state_dict().items()}

    sampler = strategy.sampler(len(labels), 0)
    losses = []
    for epoch in range(params.train.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(state.model, state.optimizer, state.scheduler, nn.CrossEntropyLoss(), images, labels, list(sampler), 32, strategy, settings)
        losses.append(stats.loss)
        assert stats.images == 128 and torch.isfinite(torch.tensor(stats.loss))

    assert seen["output"].dtype == torch.bfloat16, "bf16 autocast should be active"
    assert seen["input"].is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_cuda for p in state.bare.parameters())
    changed = [k for k, v in state.bare.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "training changed no weight"
    assert losses[-1] < losses[0], f"128 fixed images should be learnt a little in a few epochs: {losses}"


def test_ddp_over_nccl_ends_with_identical_weights_on_every_rank(tmp_path):
    gpus = torch.cuda.device_count()
    data = tmp_path / "data"
    weights = tmp_path / "weights"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    prepare = [sys.executable, str(PROBE), "--prepare", str(data), "--images-per-class", "16", "--size", "64"]
    subprocess.run(prepare, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", str(PROBE),
        "--strategy", "ddp", "--data", str(data), "--epochs", "2", "--batch-size", str(16 * gpus),
        "--json", str(tmp_path / "ddp.json"), "--save-weights", str(weights),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    import json

    summary = json.loads((tmp_path / "ddp.json").read_text())
    assert summary["backend"] == "nccl" and summary["processes"] == gpus and summary["bf16"] and summary["data_on_device"]
    states = [torch.load(weights / f"rank{rank}.pt", weights_only=True, map_location="cpu") for rank in range(gpus)]
    assert all(s["world_size"] == gpus for s in states)
    # Parameters, not buffers: without sync_batchnorm each rank's batch-norm running statistics
    # come from its own last batch, so they differ by design.
    names = states[0]["parameters"]
    assert len(names) > 10
    for other in states[1:]:
        for name in names:
            assert torch.equal(states[0]["state"][name], other["state"][name]), f"rank {other['rank']} differs from rank 0 in {name}"
    assert summary["ranks_agree"]


def test_asking_for_more_gpus_than_visible_names_how_many_there_are():
    from pipeline.errors import UserError
    from pipeline.strategy import check_visible_gpus, make_strategy

    visible = torch.cuda.device_count()
    check_visible_gpus(visible)  # exactly as many is fine
    with pytest.raises(UserError, match=rf"gpus={visible + 1} but only {visible} CUDA device\(s\) are visible"):
        check_visible_gpus(visible + 1)
    with pytest.raises(UserError, match=rf"only {visible} CUDA device"):
        make_strategy("dp", visible + 1)


def test_augmentation_on_the_gpu_matches_the_cpu():
    """Drawn on the CPU, applied where the batch lives: the same images whatever the device."""
    from pipeline.augment import BatchAugment
    from pipeline.config import AugmentConfig
    from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD

    augment = BatchAugment(AugmentConfig(), 0, 64, IMAGENET_MEAN, IMAGENET_STD).for_epoch(3)
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    index = torch.arange(64)
    on_cpu = augment(images, index)
    on_gpu = augment(images.cuda(), index.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-3)
