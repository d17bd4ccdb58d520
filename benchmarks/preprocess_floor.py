"""The least one image can cost the preprocess stage on this machine, against its target (1.8x one
core's plain PIL decode+resize, on two cores).

    python benchmarks/preprocess_floor.py                 # the full-size benchmark's JPEGs (--data)
    python benchmarks/preprocess_floor.py --sizes 64,128 --files 2000

On one core, from the page cache, per image of the same JPEGs:

  (1) plain PIL: open, convert to RGB, resize (the baseline the target is a multiple of);
  (2) libjpeg-turbo's scaled decode alone (`simplejpeg`, the least decoding work there is here);
  (3) the stage's `decode_image` (header, EXIF, scaled decode, crop, Pillow's resize);
  (4) float16 normalization into the shard layout, and (5) the shard's sha256, per image;
  (6) `make_shard` over one shard, written again and again to one path (so its page-cache pages
      are reused: no new memory);
  (7) what the shard bytes of one image cost to put in the page cache as new memory (a shard
      file of 64 MiB at a time, CPU of this process, kernel time included) against writing them
      over pages a deleted file just freed.

The floor is (2) + (4) + (5) + (7, new memory): no header, no resize, no other cost. Two cores with
no parallel loss can then reach at most 2 x (1) / floor; likewise 2 x (1) / ((6) + (7)) for the stage's
own per-image work. A measurement, not a test: always exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import simplejpeg

# After the repository on sys.path (fullsize_benchmark puts it there).
from fullsize_benchmark import TRAIN_DIR, ensure_jpegs, plain_pil_rate

from pipeline.preprocess import ShardTask, make_shard, normalize_into
from pipeline.serving.imaging import decode_image

TARGET = 1.8
SHARD_BYTES = 64 << 20
FLOOR_PARTS = ("scaled decode alone", "float16 normalization", "sha256", "shard bytes as new page cache")


def cpu_seconds() -> float:
    """User + system CPU of this process: the kernel's work on our writes counts."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_us(work: Callable[[], object], count: int, repeat: int = 3) -> float:
    """CPU microseconds per item of the fastest of `repeat` runs of `work` (which does `count` items)."""
    best = float("inf")
    for _ in range(repeat):
        started = cpu_seconds()
        work()
        best = min(best, cpu_seconds() - started)
    return best / count * 1e6


def page_cache_seconds_per_gib(folder: Path, files: int) -> tuple[float, float]:
    """CPU seconds per GiB to write `files` new 64 MiB files, and then the same files again after
    deleting them (over the pages they freed)."""
    block = np.random.default_rng(0).integers(0, 256, SHARD_BYTES, dtype=np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    rounds = []
    for _ in range(2):
        started = cpu_seconds()
        for number in range(files):
            with open(folder / f"{number}.bin", "wb") as out:
                out.write(block)
        rounds.append((cpu_seconds() - started) / (files * SHARD_BYTES / 2**30))
        for number in range(files):
            (folder / f"{number}.bin").unlink()
    return rounds[0], rounds[1]


def per_image(size: int, files: list[Path], datas: list[bytes], scratch: Path) -> dict[str, float]:
    count = len(files)
    figures = {"plain PIL": 1e6 / plain_pil_rate(files, size)}
    figures["scaled decode alone"] = best_us(
        lambda: [simplejpeg.decode_jpeg(d, colorspace="RGB", min_height=size, min_width=size) for d in datas],
        count,
    )
    figures["decode_image"] = best_us(lambda: [decode_image(f, size) for f in files], count)

    pixels = np.stack([decode_image(f, size) for f in files[:256]])
    images = np.empty((len(pixels), 3, size, size), np.float16)

    def normalize_all() -> None:  # in blocks of 64, as make_shard does
        for begin in range(0, len(pixels), 64):
            normalize_into(pixels[begin : begin + 64], images[begin : begin + 64])

    figures["float16 normalization"] = best_us(normalize_all, len(pixels))
    shard_bytes = images.tobytes()
    figures["sha256"] = best_us(lambda: hashlib.sha256(shard_bytes).digest(), len(pixels))

    image_bytes = 3 * size * size * 2
    in_shard = min(count, SHARD_BYTES // image_bytes)
    jobs = [(str(f), 0, f.name) for f in files[:in_shard]]
    task = ShardTask(scratch / "shard.safetensors", "train", jobs, size, None)
    figures["make_shard, pages reused"] = best_us(lambda: make_shard(task), in_shard)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/bench-data/asl-87k"))
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--files", type=int, default=2000, help="JPEGs timed per measurement")
    parser.add_argument("--gib", type=float, default=1.0, help="new page cache written for (7)")
    args = parser.parse_args()
    raw = ensure_jpegs(args.data)
    files = random.Random(0).sample(sorted((raw / TRAIN_DIR).glob("*/*.jpg")), args.files)
    datas = [f.read_bytes() for f in files]  # also puts every file in the page cache
    scratch = args.data / "floor-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        new, reused = page_cache_seconds_per_gib(scratch / "pages", max(1, round(args.gib * 16)))
        print(f"page cache, CPU per GiB written: {new:.2f} s as new memory, {reused:.2f} s over freed pages")
        print(f"load {os.getloadavg()[0]:.2f}; per image, one core, microseconds of CPU:")
        for size in map(int, args.sizes.split(",")):
            figures = per_image(size, files, datas, scratch)
            image_gib = 3 * size * size * 2 / 2**30
            figures["shard bytes as new page cache"] = new * image_gib * 1e6
            figures["the same over freed pages"] = reused * image_gib * 1e6
            floor = sum(figures[part] for part in FLOOR_PARTS)
            stage = figures["make_shard, pages reused"] + figures["shard bytes as new page cache"]
            print(f"\n{size} px")
            for name, value in figures.items():
                print(f"  {name:34s} {value:8.0f}")
            plain = figures["plain PIL"]
            for name, cost in (("floor (2+4+5+7)", floor), ("make_shard + new pages (6+7)", stage)):
                ceiling = 2 * plain / cost
                verdict = "within reach" if ceiling >= TARGET else "out of reach"
                print(f"  {name:34s} {cost:8.0f} -> at most {ceiling:.2f}x on 2 cores ({verdict}, {TARGET}x)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
