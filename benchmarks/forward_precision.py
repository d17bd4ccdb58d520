"""The served model's forward pass alone, fp32 against bf16, by batch size and threads: whether
`serve.bf16` / `ASL_SERVING_BF16` pays on this processor (the gain differs between CPUs: measure it).

    python benchmarks/forward_precision.py                      # resnet18 at 64 px; ~1 minute
    python benchmarks/forward_precision.py --model resnet50 --size 224

Runs `AslClassifier.probabilities` (normalization, channels_last, autocast with bf16 weights cast
once, softmax) on random pixels, every configuration in turn for `--rounds` rounds, and keeps each
one's best images/s: neighbours on a shared machine only ever slow a round down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from mlflow.pyfunc import PythonModelContext
from safetensors.torch import save_file

from pipeline.dataset import CLASSES
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD
from pipeline.serving.networks import build_model
from pipeline.serving.precision import native_bf16
from pipeline.serving.pyfunc import AslClassifier


def classifier(name: str, size: int, folder: Path) -> AslClassifier:
    torch.manual_seed(0)
    network = build_model(name, len(CLASSES)).eval()
    save_file(
        {k: v.detach().float().contiguous() for k, v in network.state_dict().items()},
        str(folder / "w.safetensors"),
    )
    config = {
        "model": {"name": name},
        "classes": list(CLASSES),
        "image_size": size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    (folder / "c.json").write_text(json.dumps(config))
    loaded = AslClassifier()
    loaded.load_context(
        PythonModelContext({"weights": str(folder / "w.safetensors"), "config": str(folder / "c.json")}, None)
    )
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    threads = sorted({1, max(1, cores - 1), cores})
    batches = [int(n) for n in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = classifier(args.model, args.size, Path(tmp))
    rng = np.random.default_rng(0)
    best: dict[tuple[int, int, str], float] = {}
    for _ in range(args.rounds):
        for count in threads:
            torch.set_num_threads(count)
            for batch in batches:
                pixels = rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
                for precision in ("fp32", "bf16"):
                    model.precision = precision
                    model.probabilities(pixels)  # warm: oneDNN builds its kernels for this shape
                    repeats = max(1, 32 // batch)
                    started = time.perf_counter()
                    for _ in range(repeats):
                        model.probabilities(pixels)
                    rate = batch * repeats / (time.perf_counter() - started)
                    best[count, batch, precision] = max(best.get((count, batch, precision), 0.0), rate)
    cpu, native = torch.cpu, native_bf16(torch.device("cpu"))
    features = f"AVX512-BF16 {cpu._is_avx512_bf16_supported()}, AMX {cpu._is_amx_tile_supported()}"
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"{args.model} at {args.size} px; torch {torch.__version__}; "
        f"native bf16: {native} ({features}); load average {load}"
    )
    print("\n| threads | batch | fp32 images/s | bf16 images/s | bf16 / fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for count in threads:
        for batch in batches:
            fp32, bf16 = best[count, batch, "fp32"], best[count, batch, "bf16"]
            print(f"| {count} | {batch} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x |")


if __name__ == "__main__":
    main()
