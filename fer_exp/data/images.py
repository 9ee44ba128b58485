"""Image decoding shared by training data and prediction: any file PIL reads (any size, colour mode or
bit depth) becomes 8-bit grayscale, and :func:`to_model_size` makes it the 48x48 the models take,
the same way for a Kaggle folder image and a user's photo."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_exp.classes import IMAGE_SIZE

DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode; the message says why."""


def read_gray(source: str | Path | bytes) -> tuple[np.ndarray, bool]:
    """(8-bit grayscale array at the file's own size, whether it was converted from another mode).
    A photo's EXIF orientation is applied, so a portrait taken on a phone stands upright."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            converted = image.mode != "L"
            if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit gray: scale to 8 bits, never clip
                array = np.asarray(image, dtype=np.float32)
                scale = 257.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 1.0
                return (array / scale + 0.5).clip(0, 255).astype(np.uint8), converted
            if image.mode == "F":  # float gray: 0-1 scaled to 0-255 (converting would round it to black), else as is
                array = np.asarray(image, dtype=np.float32)
                array = array * 255.0 if array.max(initial=0) <= 1.0 else array
                return (array + 0.5).clip(0, 255).astype(np.uint8), converted
            if converted:
                image = image.convert("L")
            return np.asarray(image, dtype=np.uint8).copy(), converted
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot be decoded as an image (not an image format PIL reads)") from None
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot be decoded as an image ({type(exc).__name__}: {exc})") from None


def to_model_size(gray: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, bool]:
    """(``size`` x ``size`` uint8, whether it was resized): a bilinear resize of the whole image."""
    if gray.shape == (size, size):
        return gray, False
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8), True


def decode_image(source: str | Path | bytes) -> np.ndarray:
    """A file or encoded bytes -> the model's 48x48 uint8 grayscale input (raises ImageDecodeError)."""
    return to_model_size(read_gray(source)[0])[0]
