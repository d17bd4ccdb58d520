"""Convolutions with small output maps on CPU: oneDNN's kernels against one matrix product.

    python benchmarks/small_map_conv.py        # about a minute

(a) One convolution, forward and backward, batch 64, channels_last, fp32 and bf16 autocast:
    `nn.Conv2d` against `GemmSmallMapConv2d` forced to take the product at any map size, for
    resnet18's 3x3 convolutions at 64 px (output maps 2x2, 4x4, 8x8): where the product wins is
    where `GEMM_MAX_OUTPUT_PIXELS` draws the line.
(b) resnet18 at 64 px as `build_model` makes it (the last stage's 2x2 maps as products) against the
    same network with every convolution back to `nn.Conv2d`, in the same run: one training step
    (batch 64, fused AdamW, 2 threads as training uses) and the forward pass by batch (1 thread, the
    served model's bf16 weights cast once), interleaved rounds, the best of each.
Prints milliseconds (a) and images/s (b); always exits 0.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch
from torch import nn

from pipeline.serving import networks

LAYERS = [
    (512, 512, 2, 1),
    (256, 512, 4, 2),
    (256, 256, 4, 1),
    (128, 128, 8, 1),
]  # in, out, input side, stride
ROUNDS = 3


def best_seconds(run: Callable[[], object], repeat: int = 5) -> float:
    for _ in range(2):
        run()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(repeat):
            run()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best


def layer_table() -> None:
    torch.set_num_threads(2)
    networks.GEMM_MAX_OUTPUT_PIXELS = 10**9  # the product at every size, to see where it wins
    print("(a) one convolution, forward + backward, batch 64, ms: conv2d / product")
    for c_in, c_out, side, stride in LAYERS:
        plain = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
        product = networks.gemm_small_maps(copy.deepcopy(plain))
        x = torch.randn(64, c_in, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
        row = []
        for bf16 in (False, True):
            times = []
            for module in (plain, product):

                def step(module: nn.Module = module, bf16: bool = bf16, x: torch.Tensor = x) -> None:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        out = module(x)
                    out.float().sum().backward()

                times.append(best_seconds(step) * 1000)
            row.append(f"{'bf16' if bf16 else 'fp32'} {times[0]:.1f} / {times[1]:.1f}")
        out_side = (side - 1) // stride + 1
        print(f"  {c_in} -> {c_out}, {out_side}x{out_side} output: " + " | ".join(row))
    networks.GEMM_MAX_OUTPUT_PIXELS = 4


def stock(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.__class__ = nn.Conv2d  # GemmSmallMapConv2d back to the plain convolution
    return model


def resnet_pair() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    product = networks.build_model("resnet18", 29).to(memory_format=torch.channels_last)
    return {"oneDNN": stock(copy.deepcopy(product)), "product": product}


def training_steps() -> None:
    torch.set_num_threads(2)
    x = torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 29, (64,))
    print("(b) resnet18 at 64 px, one training step, batch 64, images/s: oneDNN / product")
    for bf16 in (False, True):
        rates = {}
        for name, model in resnet_pair().items():
            optimizer = torch.optim.AdamW(model.parameters(), fused=True)

            def step(
                model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, bf16: bool = bf16
            ) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            rates[name] = 64 / best_seconds(step)
        print(f"  {'bf16' if bf16 else 'fp32'}: {rates['oneDNN']:.0f} / {rates['product']:.0f}")


def forward_passes() -> None:
    torch.set_num_threads(1)
    print("(b) resnet18 at 64 px, forward pass, 1 thread, images/s: oneDNN / product")
    for dtype in (torch.float32, torch.bfloat16):
        pair = {name: model.eval().to(dtype) for name, model in resnet_pair().items()}
        row = []
        for batch in (1, 8, 32):
            x = torch.randn(batch, 3, 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                rates = {name: batch / best_seconds(partial(model, x), 10) for name, model in pair.items()}
            row.append(f"batch {batch} {rates['oneDNN']:.0f} / {rates['product']:.0f}")
        print(f"  {str(dtype).removeprefix('torch.')}: " + " | ".join(row))


def main() -> None:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "?")
    print(f"torch {torch.__version__}; {cpu}")
    layer_table()
    training_steps()
    forward_passes()


if __name__ == "__main__":
    main()
