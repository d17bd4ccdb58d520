"""Decoding within a known memory: the decode's pixels are exactly those of the plain whole-image
recipe, its peak memory is what `open_image` says it will be (about the decoded image alone, not
the five copies the plain recipe makes), and the budget that concurrent decodes share holds its line.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from pipeline.serving.imaging import (
    IMAGE_FORMATS,
    _square_and_resize,
    _to_rgb,
    decode_image,
    decode_scaled_jpeg,
    open_image,
)
from pipeline.serving.limits import MIB, Busy, MemoryBudget, OverBudget


def _plain_decode(data: bytes, size: int) -> np.ndarray:
    """The recipe `decode_image` must match: decode the whole image (a colour or grey JPEG at
    libjpeg-turbo's reduced scale), turn, convert and crop it, then resize."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        decoded: Image.Image = image
        if image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L"):
            decoded = Image.fromarray(simplejpeg.decode_jpeg(data, "RGB", min_height=size, min_width=size))
            decoded.info["exif"] = image.info.get("exif", b"")
        else:
            image.draft("RGB", (size, size))
        return _square_and_resize(_to_rgb(ImageOps.exif_transpose(decoded)), size)


def _pillow_decode(data: bytes, size: int) -> np.ndarray:
    """The same recipe with Pillow's own decoder (whole, half, quarter or eighth scale)."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        image.draft("RGB", (size, size))
        return _square_and_resize(_to_rgb(ImageOps.exif_transpose(image)), size)


def _scaled(data: bytes, size: int) -> np.ndarray:
    pixels = decode_scaled_jpeg(data, size)
    assert pixels is not None, "libjpeg-turbo refused an undamaged JPEG"
    return pixels


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(width: int, height: int, mode: str, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    pixels[: height // 3, :, 3] = 0  # a transparent band: its hidden colours must not show
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        return image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return image if mode == "RGBA" else image.convert(mode)


CASES = [  # (width, height, mode, format): square and not, reduced (side >= 4 x size) and not
    (200, 200, "RGB", "JPEG"), (640, 480, "RGB", "JPEG"), (300, 1301, "L", "JPEG"),
    (640, 480, "RGBA", "PNG"), (479, 641, "LA", "PNG"), (555, 555, "P", "PNG"), (700, 301, "1", "PNG"),
    (1001, 777, "RGB", "PNG"), (333, 520, "L", "PNG"), (640, 400, "RGBA", "WEBP"), (320, 240, "CMYK", "JPEG"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("width", "height", "mode", "fmt"), CASES, ids=[f"{w}x{h}-{m}-{f}" for w, h, m, f in CASES]
)
@pytest.mark.parametrize("size", [32, 64])
def test_pixels_are_exactly_the_plain_recipes(
    width: int, height: int, mode: str, fmt: str, size: int
) -> None:
    data = _encode(_noise(width, height, mode, seed=width + height), fmt)
    np.testing.assert_array_equal(decode_image(data, size), _plain_decode(data, size))


def test_a_jpeg_decodes_at_the_smallest_eighth_of_scale_that_keeps_the_size() -> None:
    """A 200 px JPEG for 128 px decodes at 6/8 (150 px) where Pillow's draft decodes it whole; at
    half scale the pixels are Pillow's own, and the result stays that of the whole decode."""
    ramp = np.linspace(0, 255, 200, dtype=np.float32)
    smooth = np.dstack(
        [
            ramp[None, :] + 0 * ramp[:, None],
            ramp[:, None] + 0 * ramp[None, :],
            255 - ramp[None, :] / 2 + 0 * ramp[:, None],
        ]
    )
    data = _encode(Image.fromarray(smooth.astype(np.uint8)), "JPEG", quality=95)
    assert [_scaled(data, size).shape[0] for size in (128, 100, 64, 25, 24, 300)] == [
        150,
        100,
        75,
        25,
        25,
        200,
    ]
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (100, 100))
        np.testing.assert_array_equal(_scaled(data, 100), np.asarray(image))
    with Image.open(io.BytesIO(data)) as image:
        whole = np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR), dtype=np.int16)
    difference = np.abs(decode_image(data, 128) - whole)
    assert difference.mean() < 1 and difference.max() <= 4, (difference.mean(), difference.max())


def test_a_damaged_jpeg_that_pillow_recovers_still_decodes_and_a_truncated_one_is_refused() -> None:
    """libjpeg-turbo through simplejpeg refuses a JPEG at its first warning; Pillow recovers it, as
    it did before the scaled decode took over: the pixels are Pillow's."""
    data = _encode(_noise(200, 200, "RGB", seed=3), "JPEG")
    scan = data.index(b"\xff\xda")
    stray = data[:scan] + b"\x00\x00" + data[scan:]  # "2 extraneous bytes before marker 0xda"
    assert decode_scaled_jpeg(stray, 64) is None
    np.testing.assert_array_equal(decode_image(stray, 64), _pillow_decode(stray, 64))
    with pytest.raises(OSError, match="truncated"):
        decode_image(data[: len(data) // 2], 64)


def test_a_cameras_mpo_decodes_its_first_picture_by_the_scaled_path() -> None:
    first, second = _noise(200, 200, "RGB", seed=5), _noise(200, 200, "RGB", seed=6)
    data = _encode(first, "MPO", save_all=True, append_images=[second])
    with open_image(data, 100) as opened:
        assert opened.header.format == "MPO" and opened.via_simplejpeg
    # At half scale libjpeg-turbo's pixels are Pillow's: the first picture's, not the second's.
    np.testing.assert_array_equal(decode_image(data, 100), _pillow_decode(data, 100))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    ("width", "height", "fmt"), [(301, 200, "JPEG"), (1001, 777, "PNG"), (777, 1001, "PNG")]
)
def test_exif_orientation_is_exactly_the_plain_recipes(
    orientation: int, width: int, height: int, fmt: str
) -> None:
    """Only the centre square is cut and turned, band by band: the same pixels, odd sizes included."""
    image = _noise(width, height, "RGB", seed=orientation)
    exif = image.getexif()
    exif[0x0112] = orientation
    data = _encode(image, fmt, exif=exif.tobytes())
    for size in (32, 64):
        np.testing.assert_array_equal(decode_image(data, size), _plain_decode(data, size))


_PEAK_PROBE = textwrap.dedent(
    """
    import sys
    from pipeline.serving.imaging import decode_image, open_image

    def high_water_mark():  # VmHWM: unlike ru_maxrss, not inherited from the (large) parent across exec
        status = open("/proc/self/status").read().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024

    data = open(sys.argv[1], "rb").read()
    decode_image(open(sys.argv[2], "rb").read(), 64)  # decoders loaded, buffers warm
    before = high_water_mark()
    decode_image(data, 64)
    peak = high_water_mark() - before
    print(peak, open_image(data, 64).peak_bytes)
    """
)


def test_a_large_png_peaks_at_its_estimate_about_the_decoded_image(tmp_path) -> None:
    """A 3000x3000 RGBA PNG (36 MB decoded): the plain recipe peaks near 200 MB, with the image
    converted, composited and cropped whole; the decode must stay within its estimate."""
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    ramp = np.linspace(0, 255, 3000, dtype=np.uint8)
    pixels = np.dstack([np.tile(ramp, (3000, 1))] * 3 + [np.tile(ramp[:, None], (1, 3000))])
    big.write_bytes(_encode(Image.fromarray(pixels, "RGBA"), "PNG", compress_level=1))
    small.write_bytes(_encode(Image.new("RGBA", (300, 300)), "PNG"))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(big), str(small)], capture_output=True, text=True, check=True
    )
    peak, estimate = map(int, out.stdout.split())
    decoded = 3000 * 3000 * 4
    assert decoded <= estimate <= decoded + 10 * MIB
    assert decoded * 0.9 <= peak <= estimate, f"peak {peak / MIB:.0f} MB, estimate {estimate / MIB:.0f} MB"


def test_a_large_progressive_jpeg_peaks_within_its_estimate(tmp_path) -> None:
    """libjpeg holds every coefficient of a progressive JPEG at full scale (2 bytes a pixel and
    channel, chroma subsampled): 4000x3000 at 4:2:0 is 36 MB, whatever the scale of the decode."""
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
    pixels = np.dstack([np.tile(ramp, (3000, 1))] * 3)
    big.write_bytes(_encode(Image.fromarray(pixels), "JPEG", progressive=True))
    small.write_bytes(_encode(Image.new("RGB", (300, 300)), "JPEG", progressive=True))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, str(big), str(small)], capture_output=True, text=True, check=True
    )
    peak, estimate = map(int, out.stdout.split())
    coefficients = 4000 * 3000 * 2 * 3 // 2
    assert coefficients * 0.8 <= peak <= estimate, (
        f"peak {peak / MIB:.0f} MB, estimate {estimate / MIB:.0f} MB"
    )


def test_a_large_jpeg_is_estimated_at_its_reduced_scale() -> None:
    data = _encode(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG")
    with open_image(data, 64) as opened:
        assert opened.via_simplejpeg
        assert opened.peak_bytes <= 500 * 375 * 7 + 10 * MIB  # 1/8 scale, not the 48 MB of the whole image
    progressive = _encode(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG", progressive=True)
    with open_image(progressive, 64) as opened:  # libjpeg keeps the whole image's coefficients
        assert opened.peak_bytes > 4000 * 3000 * 2


# --- the budget ---------------------------------------------------------------------------------


def test_reservations_share_the_budget_and_wait_in_line() -> None:
    budget = MemoryBudget(100, max_waiting=4, timeout_s=10)
    order: list[str] = []

    def take(name: str, cost: int) -> None:
        with budget.reserve(cost):
            order.append(name)

    with budget.reserve(60), budget.reserve(40):  # both fit at once
        assert budget.used == 100
        big = threading.Thread(target=take, args=("big", 90))
        big.start()
        while budget.waiting < 1:
            time.sleep(0.001)
        small = threading.Thread(target=take, args=("small", 5))
        small.start()
        while budget.waiting < 2:
            time.sleep(0.001)
        assert order == []  # the small one would fit beside nothing, but waits behind the big one
    big.join(10)
    small.join(10)
    assert order == ["big", "small"] and budget.used == 0 and budget.waiting == 0


def test_a_full_line_or_a_long_wait_is_busy_and_too_much_is_over_budget() -> None:
    budget = MemoryBudget(100, max_waiting=0, timeout_s=0.05)
    with budget.reserve(100), pytest.raises(Busy, match="retry"), budget.reserve(1):
        pass
    patient = MemoryBudget(100, max_waiting=1, timeout_s=0.05)
    with patient.reserve(100), pytest.raises(Busy, match="within 0.05 s"), patient.reserve(1):
        pass
    with pytest.raises(OverBudget, match="more than the whole decode budget"), budget.reserve(101):
        pass
    assert budget.used == patient.used == 0 and patient.waiting == 0


def test_handing_memory_back_starts_no_process(monkeypatch) -> None:
    """A forked child (what ctypes.util.find_library does to run ldconfig) would be a copy, in RSS,
    of a server holding a gigabyte of decodes at that moment."""
    import subprocess as subprocess_module

    from pipeline.serving import limits

    def refuse(*args, **kwargs):
        raise AssertionError("return_freed_memory started a process")

    monkeypatch.setattr(subprocess_module.Popen, "__init__", refuse)
    limits._malloc_trim.cache_clear()
    assert limits.return_freed_memory() >= 0
