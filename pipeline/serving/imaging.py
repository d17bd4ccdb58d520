"""Turning one image file (or bytes, or an array) into the model's input pixels: the one path
that preprocessing, the served model and the web page share.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.serving import DEFAULT_MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS

# ImageNet statistics: torchvision's pretrained weights expect them, and they suit scratch training.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The formats a camera or browser produces. PIL reads many more (TIFF, PSD, EPS via Ghostscript...);
# every one of them is attack surface for a served model that decodes untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


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
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def decode_image(source: Path | str | bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode, centre-crop to a square and resize to `size` x `size`; returns uint8 HxWx3.

    Raises PIL's errors (or `ImageTooLarge`) for anything that is not a readable image.
    """
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(handle, formats=IMAGE_FORMATS) as image:
        check_pixels(image.width, image.height, max_pixels)
        # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: far less work than decoding 200x200
        # and throwing most of it away. draft() never goes below the requested size.
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image)
        return _square_and_resize(_to_rgb(image), size)


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


def prepare_pixels(source: Path | str | bytes | np.ndarray, size: int, max_pixels: int | None = None) -> np.ndarray:
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
