"""What one large decode costs in memory and time, by recipe, and what freed memory a server keeps.

    python benchmarks/decode_memory.py             # ~2 minutes; images cached in /tmp/asl-decode-images/

(a) Each recipe decodes each image to 64x64 in a fresh process; the peak is the process's
    high-water mark (VmHWM) above what it held before, beside `open_image`'s estimate:
    - plain: the recipe before this change: draft (JPEG), exif_transpose, convert to RGB
      (compositing transparency on white), crop the centre square, resize; each step a whole-image copy;
    - reduce after load: decode, then `Image.reduce` the whole image first (what thumbnail() does):
      the decode itself is not saved, and a transparent image is copied once more to premultiply it;
    - no draft (JPEG only): the plain recipe with JPEG's scaled decoding turned off;
    - decode_image: this repository's decode (a JPEG at libjpeg-turbo's smallest eighth of scale that
      keeps the size, centre square reduced band by band, nothing copied whole).
(b) 8 threads decode the 6300x6300 PNG at once, twice, in one process (no budget): its RSS at the
    peak and afterwards, before and after `return_freed_memory` (glibc's malloc_trim).
(c) An ordinary image (200x200 JPEG, the data set's): microseconds per decode, plain recipe against
    decode_image, and the served model's `prepare_image` (header, estimate, budget, decode); best
    of many rounds, interleaved.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.serving.imaging import IMAGE_FORMATS, _square_and_resize, _to_rgb, decode_image, open_image
from pipeline.serving.limits import MIB, return_freed_memory

CACHE = Path("/tmp/asl-decode-images")
SIDE, SIZE = 6300, 64


def make_images() -> dict[str, Path]:
    paths = {
        "PNG RGBA": CACHE / "rgba.png",
        "PNG RGB": CACHE / "rgb.png",
        "JPEG baseline": CACHE / "baseline.jpg",
        "JPEG progressive": CACHE / "progressive.jpg",
        "WebP RGBA": CACHE / "rgba.webp",
    }
    if all(path.is_file() for path in paths.values()):
        return paths
    CACHE.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    pixels = np.zeros((SIDE, SIDE, 4), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = (x // 50 % 2) * 200, (y // 70 % 2) * 180, 90
    pixels[..., 3] = np.where((x - SIDE / 2) ** 2 + (y - SIDE / 2) ** 2 < (SIDE / 3) ** 2, 255, 0)
    rgba = Image.fromarray(pixels, "RGBA")
    rgba.save(paths["PNG RGBA"])
    rgba.convert("RGB").save(paths["PNG RGB"])
    rgba.convert("RGB").save(paths["JPEG baseline"], quality=90)
    rgba.convert("RGB").save(paths["JPEG progressive"], quality=90, progressive=True)
    rgba.save(paths["WebP RGBA"], quality=80)
    return paths


def plain(data: bytes, draft: bool = True) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        if draft:
            image.draft("RGB", (SIZE, SIZE))
        return _square_and_resize(_to_rgb(ImageOps.exif_transpose(image)), SIZE)


def reduce_after_load(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        image.draft("RGB", (SIZE, SIZE))
        image.load()
        factor = max(1, int(min(image.size) / SIZE / 2))
        return _square_and_resize(_to_rgb(image.reduce(factor) if factor > 1 else image), SIZE)


RECIPES = {
    "plain": plain,
    "reduce after load": reduce_after_load,
    "no draft": lambda data: plain(data, draft=False),
    "decode_image": lambda data: decode_image(data, SIZE),
}


def probe(recipe: str, path: str) -> None:
    """In a fresh process: the recipe's peak above the warmed-up process, seconds, the estimate."""
    Image.MAX_IMAGE_PIXELS = None
    data = Path(path).read_bytes()
    warm = io.BytesIO()
    Image.new("RGBA", (300, 300)).save(warm, "PNG")
    RECIPES[recipe](warm.getvalue())
    before = high_water_mark()
    started = time.perf_counter()
    RECIPES[recipe](data)
    seconds = time.perf_counter() - started
    peak = high_water_mark() - before
    with open_image(data, SIZE) as opened:
        print(peak, seconds, opened.peak_bytes)


def high_water_mark() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    line = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")
    )
    return int(line.split()[1]) * 1024


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def concurrent_decodes(path: Path) -> str:
    data, peak, done = path.read_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    idle = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            list(pool.map(lambda _: decode_image(data, SIZE), range(8)))
    done.set()
    sampler.join()
    kept = rss()
    seconds = return_freed_memory()
    return (
        f"8 threads x 2 rounds: peak +{(peak[0] - idle) / MIB:.0f} MB; "
        f"afterwards +{(kept - idle) / MIB:.0f} MB, "
        f"after malloc_trim +{(rss() - idle) / MIB:.0f} MB (the trim took {seconds * 1000:.0f} ms)"
    )


def ordinary_decodes() -> str:
    from pipeline.serving.limits import MemoryBudget
    from pipeline.serving.pyfunc import AslClassifier

    gradient = np.linspace(0, 255, 200 * 200 * 3).reshape(200, 200, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    served = AslClassifier()  # only what prepare_image reads; no network needed
    served.image_size, served.max_pixels, served.budget = SIZE, 40_000_000, MemoryBudget(1024 * MIB)
    recipes = {"plain": plain, "decode_image": RECIPES["decode_image"], "prepare_image": served.prepare_image}
    best = dict.fromkeys(recipes, float("inf"))
    for _ in range(30):
        for name, recipe in recipes.items():
            started = time.perf_counter()
            for _ in range(50):
                recipe(data)
            best[name] = min(best[name], (time.perf_counter() - started) / 50)
    return ", ".join(f"{name} {seconds * 1e6:.0f} us" for name, seconds in best.items())


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        probe(sys.argv[2], sys.argv[3])
        return
    images = make_images()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("\n| image (6300x6300) | file | recipe | peak above before | seconds | estimate (open_image) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, path in images.items():
        for recipe in RECIPES:
            if recipe == "no draft" and not name.startswith("JPEG"):
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--probe", recipe, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            peak, seconds, estimate = out.stdout.split()
            print(
                f"| {name} | {path.stat().st_size / 1e6:.2f} MB | {recipe} | {int(peak) / MIB:.0f} MB "
                f"| {float(seconds):.2f} | "
                f"{int(estimate) / MIB:.0f} MB |",
                flush=True,
            )
    print(f"\n(b) {images['PNG RGBA'].name}: {concurrent_decodes(images['PNG RGBA'])}")
    print(f"\n(c) 200x200 JPEG to {SIZE}x{SIZE}, per image: {ordinary_decodes()}")


if __name__ == "__main__":
    main()
