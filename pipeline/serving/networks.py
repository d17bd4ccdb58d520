"""The classifiers: torchvision architectures with a new head, and a small CNN for tests.

The head is replaced here, before any DataParallel/DDP wrapping: a head swapped in after wrapping
is a module the wrapper never registered, so DDP would not synchronize it.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.serving import MODEL_NAMES

GEMM_MAX_OUTPUT_PIXELS = 4
"""On CPU, a convolution with an output map of at most this many pixels runs as one matrix product."""
GEMM_MIN_FP32_ROWS = 8
"""... unless it computes in fp32 and the product has fewer rows (batch x output pixels) than this:
one image's 2x2 map is faster in oneDNN's fp32 kernel (the product takes 1.2x as long for a 3x3, 9x
for a 1x1), two images' already in the product (1.3-1.6x faster); in bf16 the product wins from one."""


class GemmSmallMapConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state_dict) that on CPU computes an output map of at most 4
    pixels (2x2, 1x4, ...) as one matrix product: a row per output pixel of its input patch, times
    the flattened weight. oneDNN's convolution kernels take 1.7-3.6x as long there, forward and
    backward, fp32 and bf16 (resnet's last stage at 64 px: benchmarks/small_map_conv.py); on larger
    maps, and for a single fp32 image (GEMM_MIN_FP32_ROWS), they are faster, and other devices keep
    their own kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = cast(tuple[int, int], self.padding)  # gemm_small_maps swaps no "same"/"valid" padding
        height, width = (
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                input.shape[-2:], padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        if input.device.type != "cpu" or input.dim() != 4 or height * width > GEMM_MAX_OUTPUT_PIXELS:
            return super().forward(input)
        autocast = torch.is_autocast_enabled("cpu")
        computes_in = torch.get_autocast_dtype("cpu") if autocast else input.dtype
        if computes_in == torch.float32 and input.shape[0] * height * width < GEMM_MIN_FP32_ROWS:
            return super().forward(input)
        patches = F.unfold(input, self.kernel_size, self.dilation, padding, self.stride)  # N, C*k*k, H*W
        batch, channels, pixels = input.shape[0], input.shape[1], height * width
        positions = self.kernel_size[0] * self.kernel_size[1]
        # One row per output pixel, ordered (kernel position, channel) as a channels_last weight lies
        # in memory: the weight is then a view, not a copy per call.
        rows = patches.view(batch, channels, positions, pixels).permute(0, 3, 2, 1)
        rows = rows.reshape(batch * pixels, positions * channels)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, positions * channels)
        out = F.linear(rows, weight, self.bias)  # N*H*W, out_channels
        # In memory N x H x W x C, the channels_last layout of N x C x H x W; the input's layout then.
        out = out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        channels_last = input.is_contiguous(memory_format=torch.channels_last)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def gemm_small_maps(model: nn.Module) -> nn.Module:
    """Every plain convolution of `model` (dense, zero-padded) becomes a GemmSmallMapConv2d, in place."""
    for module in model.modules():
        plain = type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
        if plain and not isinstance(module.padding, str):
            module.__class__ = GemmSmallMapConv2d  # the same module, parameters and hooks; a new forward
    return model


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head: trains in seconds on CPU; has no batch-norm, so its
    result does not depend on how a batch is split across processes."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a partial download raises RuntimeError
        raise UserError(
            f"could not load the pretrained {name} weights ({type(err).__name__}: {err}): "
            "connect to the internet once so torchvision can cache them under $TORCH_HOME, "
            "or set model.pretrained: false"
        ) from None


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):  # resnets
        head = nn.Linear(fc.in_features, num_classes)
        model.fc = head
        return head
    classifier = model.classifier  # mobilenet_v3: the last Linear of the classifier Sequential
    assert isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear)
    classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
    return classifier


def build_model(
    name: str, num_classes: int, *, pretrained: bool = False, freeze_backbone: bool = False
) -> nn.Module:
    """A fresh `name` model (one of MODEL_NAMES) with a `num_classes` head; backbone frozen if asked."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    if name == "small_cnn":
        if pretrained:
            raise UserError(
                "model.pretrained: true needs a torchvision model: small_cnn has no pretrained weights"
            )
        small = SmallCNN(num_classes)
        model: nn.Module = small
        head: nn.Module = small.fc
    else:
        model = _torchvision_model(name, pretrained)
        head = _replace_head(model, num_classes)
    if freeze_backbone:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in head.parameters():
            parameter.requires_grad_(True)
    return gemm_small_maps(model)


@torch.inference_mode()
def class_probabilities(
    network: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    """Softmax probabilities (float64, N x classes) of normalized images (N x 3 x S x S, any float
    dtype), in order, `batch_size` at a time so memory stays bounded whatever N is."""
    network = network.to(device).eval()
    chunks = [np.zeros((0, 0))]
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        chunks.append(torch.softmax(network(batch).float(), dim=1).double().cpu().numpy())
    return np.concatenate(chunks[1:]) if len(chunks) > 1 else chunks[0]
