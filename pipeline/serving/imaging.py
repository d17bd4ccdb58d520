"""Turning one image file (or bytes, or an array) into the model's input pixels: the one path
that preprocessing, the served model and the web page share.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, JpegImagePlugin

from pipeline.serving import DEFAULT_MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS

# ImageNet statistics: torchvision's pretrained weights expect them, and they suit scratch training.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The formats a camera or browser produces. PIL reads many more (TIFF, PSD, EPS via Ghostscript...);
# every one of them is attack surface for a served model that decodes untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
REDUCING_GAP = 2.0  # resize(): whole-factor reduction first, then bilinear over the last factor of 2 or more
_WORKING_BYTES = 8 << 20  # the decoder's buffers, the reduced square and its conversions


class ImageTooLarge(ValueError):
    """The image's pixel count is above the limit (a decompression bomb, or simply too big)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas would otherwise turn into whatever colour the hidden pixels hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {max_pixels}")


def _square_and_resize(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop an RGB image to a square and resize it to `size` x `size`: the one geometry
    every input goes through, whether it arrived encoded or as raw pixels."""
    side = min(image.size)
    if image.width != image.height:
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.asarray(image, dtype=np.uint8)


# --- decoding encoded images within a known memory --------------------------------------------


def _bytes_per_pixel(mode: str) -> int:
    return (
        2 if mode.startswith("I;16") else 1 if mode in ("1", "L", "P") else 4
    )  # how Pillow stores each mode


@dataclass
class OpenedImage:
    """An image file's bytes with only its header read; `decode_opened` decodes it. Close it (or use
    it as a context manager) when done."""

    header: Image.Image
    data: bytes
    via_simplejpeg: bool
    """A colour or grey JPEG (or a camera's MPO, whose first picture is one), decoded by libjpeg-turbo
    at any of its eighths of scale (Pillow's draft only halves). CMYK and the other formats go
    through Pillow, whose conversions they need."""
    peak_bytes: int
    """What decoding it holds at its peak, the file's bytes included."""

    def close(self) -> None:
        self.header.close()

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_image(source: Path | str | bytes, size: int, max_pixels: int | None = None) -> OpenedImage:
    """The file's bytes, read whole, and its image with only the header parsed (size checked), with
    the bytes its decode by `decode_opened` holds at its peak."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    try:
        check_pixels(image.width, image.height, max_pixels)
        full_pixels, channels = image.width * image.height, len(image.getbands())
        via_simplejpeg = image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L")
        # JPEG can decode straight at a reduced scale: far less work and memory than decoding it
        # whole and throwing most of it away. draft() sets up Pillow's 1/2, 1/4 or 1/8 (never below
        # the requested size), an upper bound on the eighths libjpeg-turbo picks for a scaled JPEG.
        image.draft("RGB", (size, size))
        if via_simplejpeg:  # its RGB pixels, then Pillow's copy (4 bytes a pixel)
            peak = image.width * image.height * (3 + 4)
        else:
            peak = image.width * image.height * _bytes_per_pixel(image.mode)
        if image.format == "WEBP":
            peak *= 4  # libwebp's canvas and last frame, the bytes it hands over, then Pillow's copy
        if image.info.get("progressive"):
            # libjpeg holds every DCT coefficient (2 bytes) at full scale, chroma subsampled 1x, 2x or 4x.
            chroma = {0: 1.0, 1: 0.5, 2: 0.25}.get(JpegImagePlugin.get_sampling(image), 1.0)
            peak += int(full_pixels * 2 * (1 + (channels - 1) * chroma))
        return OpenedImage(image, data, via_simplejpeg, peak + len(data) + _WORKING_BYTES)
    except BaseException:
        image.close()
        raise


_Box = tuple[int, int, int, int]
# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
)


def _stored_box(box: _Box, turn: Image.Transpose, width: int, height: int) -> _Box:
    """Where `box` of the upright image lies in the stored `width` x `height` image."""
    x0, y0, x1, y1 = box
    return {
        Image.Transpose.FLIP_LEFT_RIGHT: (width - x1, y0, width - x0, y1),
        Image.Transpose.ROTATE_180: (width - x1, height - y1, width - x0, height - y0),
        Image.Transpose.FLIP_TOP_BOTTOM: (x0, height - y1, x1, height - y0),
        Image.Transpose.TRANSPOSE: (y0, x0, y1, x1),
        Image.Transpose.ROTATE_270: (y0, height - x1, y1, height - x0),
        Image.Transpose.TRANSVERSE: (width - y1, height - x1, width - y0, height - x0),
        Image.Transpose.ROTATE_90: (width - y1, x0, width - y0, x1),
    }[turn]


def _upright_region(image: Image.Image, box: _Box, turn: Image.Transpose | None) -> Image.Image:
    """`box` of the upright image, cut from the stored one: only the region is copied and turned."""
    if turn is None:
        return image if box == (0, 0, *image.size) else image.crop(box)
    return image.crop(_stored_box(box, turn, *image.size)).transpose(turn)


def _reduced_square(image: Image.Image, box: _Box, factor: int, turn: Image.Transpose | None) -> Image.Image:
    """The square `box` of the upright image in RGB (or L), reduced `factor` times, with no full-size copy."""
    if turn is None and image.mode in ("L", "RGB"):
        return image.reduce(factor, box)  # averages straight from the decoded pixels
    # Otherwise turned and converted before being averaged, as `_to_rgb` then `resize` would do, one
    # band of `factor` rows at a time: whole-image copies would double or triple the memory.
    side = box[2] - box[0]
    reduced = Image.new("RGB", (-(-side // factor), -(-side // factor)))
    for row, top in enumerate(range(box[1], box[3], factor)):
        band = _upright_region(image, (box[0], top, box[2], min(top + factor, box[3])), turn)
        reduced.paste(_to_rgb(band).reduce(factor), (0, row))
    return reduced


def decode_opened(opened: OpenedImage, size: int) -> np.ndarray:
    """Decode an image from `open_image` to uint8 `size` x `size` x 3: upright (EXIF orientation),
    centre-cropped to a square, resized.

    Beside the decoded pixels, nothing larger than the centre square is held, and for a large image
    not even that: it is reduced by a whole factor first, band by band. The pixels are exactly those
    of decoding (a JPEG at the smallest of libjpeg's eighths of scale that keeps `size`), turning,
    converting and cropping the whole image, then `resize(reducing_gap=2)`.
    """
    header = opened.header
    pixels = decode_scaled_jpeg(opened.data, size) if opened.via_simplejpeg else None
    if pixels is not None:
        image = Image.fromarray(pixels)
    else:
        header.load()  # a PNG's EXIF may follow its pixels
        image = header
    turn = _UPRIGHT.get(header.getexif().get(ExifTags.Base.Orientation, 1))
    width, height = image.size[::-1] if turn in _QUARTER_TURNS else image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    factor = int(side / size / REDUCING_GAP)  # the reduction resize() itself would make
    if factor > 1:
        square = _reduced_square(image, box, factor, turn)
        resize_box = (0.0, 0.0, side / factor, side / factor)  # what resize() keeps after reducing
    else:
        square, resize_box = _upright_region(image, box, turn), None
    square = _to_rgb(square)
    if square.size != (size, size) or resize_box is not None:
        square = square.resize(
            (size, size), Image.Resampling.BILINEAR, box=resize_box, reducing_gap=REDUCING_GAP
        )
    return np.asarray(square, dtype=np.uint8)


def decode_scaled_jpeg(data: bytes, size: int) -> np.ndarray | None:
    """A colour or grey JPEG as uint8 HxWx3 RGB, decoded at the smallest of libjpeg-turbo's eighths of
    scale that keeps both sides at least `size` (whole scale for a smaller image). The same pixels as
    Pillow at whole, half, quarter and eighth scale; the other eighths cut the work that much more.

    None where libjpeg reports damage (a flipped byte, stray bytes before a marker, a cut file): then
    Pillow decodes it, which recovers what libjpeg can and refuses a truncated file, as before."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
    except ValueError:
        return None


def decode_image(source: Path | str | bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode, centre-crop to a square and resize to `size` x `size`; returns uint8 HxWx3.

    Raises PIL's errors (or `ImageTooLarge`) for anything that is not a readable image.
    """
    with open_image(source, size, max_pixels) as opened:
        return decode_opened(opened, size)


def resize_pixels(pixels: np.ndarray, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Raw uint8 pixels (HxW grey, HxWx3 RGB or HxWx4 RGBA) -> uint8 `size` x `size` x 3, the same
    way `decode_image` treats a decoded file with those pixels.

    Raises `ValueError` (or `ImageTooLarge`) for an array that is not such an image.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ValueError(f"pixels must be HxW, HxWx3 or HxWx4, got shape {pixels.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    check_pixels(pixels.shape[1], pixels.shape[0], max_pixels)
    return _square_and_resize(_to_rgb(Image.fromarray(pixels)), size)


def prepare_pixels(
    source: Path | str | bytes | np.ndarray, size: int, max_pixels: int | None = None
) -> np.ndarray:
    """`resize_pixels` for an array, `decode_image` for a file or encoded bytes."""
    if isinstance(source, np.ndarray):
        return resize_pixels(source, size, max_pixels)
    return decode_image(source, size, max_pixels)


def normalize(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 NxHxWx3 (or HxWx3) -> float32 Nx3xHxW (or 3xHxW), scaled to [0, 1] then standardized."""
    scaled = pixels.astype(np.float32) / 255.0
    standardized = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.moveaxis(standardized, -1, -3)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
