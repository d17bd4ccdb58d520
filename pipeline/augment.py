"""Training augmentation applied to a batch where it lives (GPU or CPU): random resized crop, small
rotation, brightness/contrast/saturation/hue jitter, optional horizontal flip (`train.augment`).

Each image's random parameters come from a table drawn once per epoch from (seed, epoch) and indexed
by the image's position in the training split, so an image is changed the same way whichever batch,
rank or strategy (dp, ddp, any world size) it lands in, and a resumed training repeats it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional
from torchvision.transforms.v2 import functional as tvf

from pipeline.config import AugmentConfig

Augment = Callable[[torch.Tensor, int], torch.Tensor]
"""(normalized float batch N x 3 x S x S, the step's number in the epoch) -> augmented batch."""

_RATIO = (3 / 4, 4 / 3)  # crop aspect ratios, torchvision's RandomResizedCrop default
_COLUMNS = 10  # random numbers per image: area, ratio, centre x, centre y, angle, 4 colour factors, flip
# RGB -> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, one 3x3 matrix per image.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


class BatchAugment:
    """The training split's augmentation; `for_epoch(epoch)` gives the function the loop applies."""

    def __init__(
        self, config: AugmentConfig, seed: int, dataset_size: int, mean: Sequence[float], std: Sequence[float]
    ):
        self.config, self.seed, self.dataset_size = config, seed, dataset_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def draws(self, epoch: int) -> torch.Tensor:
        """dataset_size x _COLUMNS uniform numbers in [0, 1), on the CPU: the same on every device."""
        state = np.random.SeedSequence([self.seed, epoch, 0xA06]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.rand(self.dataset_size, _COLUMNS, generator=generator)

    def for_epoch(self, epoch: int, step_indices: np.ndarray) -> Augment | None:
        """None when augmentation is off, so the loop adds nothing to the step. `step_indices` holds
        the split indices of each step's images, in the batch's row order (pipeline.feed)."""
        if not self.config.enabled:
            return None
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def augment(images: torch.Tensor, step: int) -> torch.Tensor:
            if images.device not in on_device:  # drawn once per epoch, copied once per device
                host_draws = self.draws(epoch)
                host_indices = torch.from_numpy(np.ascontiguousarray(step_indices))
                if images.device.type == "cuda":  # pinned and non-blocking: no step waits for the copy
                    host_draws, host_indices = host_draws.pin_memory(), host_indices.pin_memory()
                on_device[images.device] = (
                    host_draws.to(images.device, non_blocking=True),
                    host_indices.to(images.device, non_blocking=True),
                )
            draws, indices = on_device[images.device]
            return self.apply(images, draws[indices[step]])

        return augment

    def apply(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Augment normalized images with one row of `draws` per image."""
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = self._geometry(images.float(), draws) * std + mean  # back to [0, 1] for the colour jitter
        pixels = self._colour(pixels.clamp(0.0, 1.0), draws)
        out = (pixels - mean) / std
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _geometry(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Crop, rotate and flip each image in one batched resampling (affine_grid + grid_sample)."""
        cfg = self.config
        area = cfg.crop_scale + draws[:, 0] * (1.0 - cfg.crop_scale)
        log_low, log_high = math.log(_RATIO[0]), math.log(_RATIO[1])
        ratio = torch.exp(log_low + draws[:, 1] * (log_high - log_low))
        width, height = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
        centre_x, centre_y = (2 * draws[:, 2] - 1) * (1 - width), (2 * draws[:, 3] - 1) * (1 - height)
        angle = torch.deg2rad((2 * draws[:, 4] - 1) * cfg.rotation_degrees)
        if cfg.horizontal_flip:
            width = torch.where(draws[:, 9] < 0.5, -width, width)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Output coordinates (-1..1) -> input coordinates: rotate the crop's box about its centre.
        theta = torch.stack(
            [
                torch.stack([cos * width, -sin * height, centre_x], dim=1),
                torch.stack([sin * width, cos * height, centre_y], dim=1),
            ],
            dim=1,
        )
        grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
        # Reflection: a rotated crop's corners show the image mirrored, not a black wedge to learn from.
        return functional.grid_sample(
            images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def _colour(self, pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """torchvision's ColorJitter formulas with a factor per image, clamped to [0, 1] after each."""
        cfg = self.config

        def factor(column: int, spread: float) -> torch.Tensor:
            return (1 + (2 * draws[:, column] - 1) * spread).view(-1, 1, 1, 1)

        pixels = (pixels * factor(5, cfg.brightness)).clamp(0.0, 1.0)
        grey_mean = tvf.rgb_to_grayscale(pixels).mean(dim=(1, 2, 3), keepdim=True)
        contrast = factor(6, cfg.contrast)
        pixels = (contrast * pixels + (1 - contrast) * grey_mean).clamp(0.0, 1.0)
        saturation = factor(7, cfg.saturation)
        pixels = (saturation * pixels + (1 - saturation) * tvf.rgb_to_grayscale(pixels)).clamp(0.0, 1.0)
        if cfg.hue == 0:
            return pixels
        turn = (2 * draws[:, 8] - 1) * cfg.hue * 2 * math.pi
        cos, sin = torch.cos(turn), torch.sin(turn)
        one, zero = torch.ones_like(cos), torch.zeros_like(cos)
        rotation = torch.stack(
            [
                torch.stack([one, zero, zero], dim=1),
                torch.stack([zero, cos, -sin], dim=1),
                torch.stack([zero, sin, cos], dim=1),
            ],
            dim=1,
        )
        yiq = _YIQ.to(pixels.device)
        matrices = torch.linalg.inv(yiq) @ rotation @ yiq
        return torch.bmm(matrices, pixels.flatten(2)).view_as(pixels).clamp(0.0, 1.0)
