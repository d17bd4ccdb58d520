"""Which precision a forward pass runs in: bf16 autocast where the device computes bf16 natively
(CUDA, or a CPU with AVX512-BF16 or AMX), fp32 elsewhere, where emulated bf16 is slower than fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware. On CPU that takes AVX512-BF16 or AMX, and oneDNN,
    whose kernels use them (AMD Zen 4 has AVX512-BF16 but no AMX: there the gain is to be measured)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up
        has_isa = any(getattr(cpu, name, lambda: False)() for name in checks)
        return has_isa and torch.backends.mkldnn.is_available()
    return False


def precision(device: torch.device, bf16_wanted: bool) -> str:
    """`bf16` when it is wanted and native on `device`, else `fp32`: what a run records it used."""
    return "bf16" if bf16_wanted and native_bf16(device) else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision_: str) -> Iterator[None]:
    """bf16 autocast on `device` for `precision_ == "bf16"`, nothing for `fp32`."""
    if precision_ != "bf16":
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield
