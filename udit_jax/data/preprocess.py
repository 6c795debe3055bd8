"""Image preprocessing as the official training scripts do it (ADM centre crop, flips, [-1, 1]).

    image = decode_image(data, min_side=16, max_pixels=2**27)   # PIL RGB image, or BadImageError
    pixels = center_crop_arr(image, 256)                        # uint8 [256, 256, 3]
    x = to_unit_range(pixels)                                   # float32 in [-1, 1]

The official pipeline is torchvision's ImageFolder loader (`Image.open(f).convert("RGB")`), then
ADM's `center_crop_arr`, RandomHorizontalFlip, ToTensor and Normalize(0.5, 0.5) (SPEC section 5).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Modes whose samples are wider than 8 bits (16-bit PNGs, 32-bit int/float TIFFs): convert("RGB")
# clips them to garbage, so they are reported as bad files instead.
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class BadImageError(ValueError):
    """A file that cannot be used as a training image; the message says why."""


def decode_image(data: bytes, *, min_side: int = 1, max_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> fully decoded RGB PIL image.

    Raises BadImageError for empty or truncated files, non-images, images with more than 8 bits
    per sample, images whose short side is below `min_side`, or with more than `max_pixels`
    pixels (checked from the header, before decoding).
    """
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces PIL's decompression-bomb heuristics.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if min(width, height) < min_side:
                raise BadImageError(f"too small: {width}x{height} (data.min_image_side={min_side})")
            if max_pixels is not None and width * height > max_pixels:
                raise BadImageError(f"too large: {width}x{height} (data.max_image_pixels={max_pixels})")
            if image.mode in WIDE_MODES:
                raise BadImageError(f"{image.mode} samples (more than 8 bits per channel) are not supported")
            image.load()
            return to_rgb(image)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as torchvision's loader makes it: grayscale/palette/CMYK converted, alpha dropped."""
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: PIL image -> uint8 [image_size, image_size, channels].

    Halve with BOX filtering while the short side is at least twice the target, resize with
    BICUBIC so the short side equals the target (long side rounded), then crop the centre
    (offsets rounded down).
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    arr = arr[top:top + image_size, left:left + image_size]
    return arr if arr.ndim == 3 else arr[..., None]


def pad_to(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Centres uint8 [h, w, C] on a black (-1 after scaling) [image_size, image_size, C] canvas."""
    height, width = pixels.shape[:2]
    if height > image_size or width > image_size:
        raise ValueError(f"cannot pad a {height}x{width} image to {image_size}x{image_size}")
    top, left = (image_size - height) // 2, (image_size - width) // 2
    out = np.zeros((image_size, image_size) + pixels.shape[2:], pixels.dtype)
    out[top:top + height, left:left + width] = pixels
    return out


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] exactly as ToTensor + Normalize(0.5, 0.5): (p / 255 - 0.5) / 0.5."""
    return (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def hflip(images: np.ndarray) -> np.ndarray:
    """Mirror left-right: [..., H, W, C] -> [..., H, W, C]."""
    return images[..., ::-1, :]


def load_rgb(payload: bytes | np.ndarray, *, min_side: int = 1, max_pixels: int | None = None) -> Image.Image:
    """A source payload (encoded bytes, or a uint8 [h, w] / [h, w, C] array) -> RGB PIL image."""
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim not in (2, 3):
            raise BadImageError(f"array payload must be uint8 [h, w(, C)], got {payload.dtype} {payload.shape}")
        height, width = payload.shape[:2]
        if min(height, width) < min_side:
            raise BadImageError(f"too small: {width}x{height} (data.min_image_side={min_side})")
        array = payload[..., 0] if payload.ndim == 3 and payload.shape[2] == 1 else payload
        return to_rgb(Image.fromarray(array))
    return decode_image(payload, min_side=min_side, max_pixels=max_pixels)
