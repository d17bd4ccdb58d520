"""The label every MLflow run carries for the device it ran on, so that a CPU figure is never read
as a GPU one."""

from __future__ import annotations

import sys
from typing import Any


def device_label(device: Any = None) -> str:
    """`cpu`, or the CUDA device's name (`device`, default the first GPU when there is one).

    Without torch imported, the stage did its work on the CPU: that is not worth importing torch for.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return "cpu"
    device = torch.device("cuda", 0) if device is None else torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
