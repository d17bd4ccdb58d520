"""Training augmentation: per-image random changes that a seed fixes, that change the batch, and that
do not depend on which batch, rank or strategy an image lands in."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.augment import BatchAugment
from pipeline.config import AugmentConfig
from pipeline.feed import tensor_batches
from pipeline.loop import StepSettings, train_one_epoch
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD
from pipeline.serving.networks import build_model
from pipeline.strategy import Strategy

IMAGES = 24


def batch(seed: int = 0) -> torch.Tensor:
    """Normalized images with structure (a bright square on a gradient), so crops and rotations show."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(IMAGES, 3, 32, 32).clone()
    pixels[:, :, 8:20, 10:22] = torch.rand(IMAGES, 3, 1, 1, generator=generator)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def augmenter(seed: int = 0, **changes) -> BatchAugment:
    return BatchAugment(
        dataclasses.replace(AugmentConfig(), **changes), seed, IMAGES, IMAGENET_MEAN, IMAGENET_STD
    )


def augmented(augment: BatchAugment, epoch: int, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x` (images `index` of the split) as the loop's step 0 of `epoch` augments it."""
    step = augment.for_epoch(epoch, index.numpy()[None, :])
    assert step is not None, "augmentation is on"
    return step(x, 0)


def test_the_same_seed_and_epoch_give_the_same_images_and_others_do_not():
    x, index = batch(), torch.arange(IMAGES)
    first = augmented(augmenter(seed=3), 1, x, index)
    assert torch.equal(first, augmented(augmenter(seed=3), 1, x, index)), "a seed must fix the augmentation"
    assert not torch.allclose(first, augmented(augmenter(seed=4), 1, x, index))
    assert not torch.allclose(first, augmented(augmenter(seed=3), 2, x, index)), "each epoch draws anew"


def test_it_changes_every_image_and_keeps_shape_dtype_and_layout():
    x = batch().contiguous(memory_format=torch.channels_last)
    out = augmented(augmenter(), 0, x, torch.arange(IMAGES))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.is_contiguous(memory_format=torch.channels_last), "the model's memory format survives"
    changed = (out - x).abs().flatten(1).mean(dim=1)
    assert (changed > 0.05).all(), f"some images came back (nearly) unchanged: {changed.min():.4f}"
    # Still images of the same data: pixel values stay within what normalization of [0, 1] allows.
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (out >= low.view(1, 3, 1, 1) - 1e-5).all() and (out <= high.view(1, 3, 1, 1) + 1e-5).all()


def test_an_image_is_changed_the_same_way_in_any_batch():
    """What makes dp and ddp (any world size) train on the same augmented images."""
    x, index = batch(), torch.arange(IMAGES)
    augment = augmenter(seed=5)
    whole = augmented(augment, 0, x, index)
    order = torch.randperm(IMAGES, generator=torch.Generator().manual_seed(1))
    for part in order.split(7):  # another rank's or another step's share, in another order
        torch.testing.assert_close(
            augmented(augment, 0, x[part], index[part]), whole[part], rtol=0, atol=1e-6
        )


def test_disabled_or_neutral_settings_leave_the_batch_alone():
    assert augmenter(enabled=False).for_epoch(0, np.arange(IMAGES)[None, :]) is None, (
        "off means no work in the step at all"
    )
    neutral = augmenter(
        crop_scale=1.0, rotation_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0
    )
    x, index = batch(), torch.arange(IMAGES)
    # The crop still keeps the whole area at a drawn aspect ratio, so it squeezes a little: far less
    # than the default settings change.
    gentle = (augmented(neutral, 0, x, index) - x).abs().mean()
    assert gentle < 0.3 * (augmented(augmenter(), 0, x, index) - x).abs().mean()


def test_no_flip_by_default_and_flips_when_asked():
    """Handedness carries meaning in ASL: the default never mirrors an image."""
    x = torch.zeros(IMAGES, 3, 32, 32)
    x[..., :16] = 2.0  # left half bright
    plain: dict[str, Any] = {
        "crop_scale": 1.0,
        "rotation_degrees": 0.0,
        "brightness": 0.0,
        "contrast": 0.0,
        "saturation": 0.0,
        "hue": 0.0,
    }
    unflipped = augmented(augmenter(**plain), 0, x, torch.arange(IMAGES))
    assert (unflipped[..., :8].mean(dim=(1, 2, 3)) > unflipped[..., -8:].mean(dim=(1, 2, 3))).all()
    flipped = augmented(augmenter(horizontal_flip=True, **plain), 0, x, torch.arange(IMAGES))
    mirrored = flipped[..., :8].mean(dim=(1, 2, 3)) < flipped[..., -8:].mean(dim=(1, 2, 3))
    assert 0 < mirrored.sum() < IMAGES, "about half the images are mirrored"


def _one_epoch(augment: BatchAugment | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("small_cnn", 29)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    labels = torch.arange(IMAGES) % 29
    settings = StepSettings(device=torch.device("cpu"), channels_last=False, bf16=False)
    steps = np.random.default_rng(0).permutation(IMAGES).reshape(3, 8)  # rows in the batches' order
    batches = tensor_batches(batch().half(), labels, list(steps), settings)
    step_augment = augment.for_epoch(0, steps) if augment else None
    train_one_epoch(
        model, optimizer, scheduler, nn.CrossEntropyLoss(), batches, Strategy(torch.device("cpu")), settings,
        augment=step_augment,
    )  # fmt: skip
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_training_loop_trains_on_the_augmented_batch_reproducibly():
    plain = _one_epoch(None)
    first, second = _one_epoch(augmenter()), _one_epoch(augmenter())
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, same weights"
    assert any(not torch.allclose(first[k], plain[k]) for k in first), (
        "the loop must use the augmented images"
    )
