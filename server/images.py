"""Pixels to PNG/JPEG/WebP bytes, and the checks an uploaded input image must pass."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
INPUT_FORMATS = {"PNG", "JPEG", "WEBP"}


class InputImageError(ValueError):
    """An uploaded image that cannot be used."""


def encode_image(pixels: np.ndarray, output_format: str, compression: int = 100) -> bytes:
    """pixels uint8 [H, W, 3] -> file bytes; `compression` (0-100) is the JPEG/WebP quality, 100 = best."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB")
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=compression)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=compression, lossless=compression == 100)
    else:
        raise ValueError(f"output_format must be one of {', '.join(MIME_TYPES)}; got {output_format!r}")
    return buffer.getvalue()


def check_input_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an uploaded PNG/JPEG/WebP, fully decoded once to prove it is intact."""
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputImageError("the file is not a PNG, JPEG or WebP image") from err
    try:
        with image:
            if image.format not in INPUT_FORMATS:
                raise InputImageError(f"the image must be PNG, JPEG or WebP, got {image.format or 'unknown'}")
            width, height = image.size
            if width * height > max_pixels:  # checked from the header, before decoding a decompression bomb
                raise InputImageError(f"the image has {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()
    except InputImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise InputImageError(f"the image cannot be decoded: {err}") from err
    return width, height
