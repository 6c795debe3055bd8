"""From uint8 images to the Inception input: the two conventions behind published numbers.

  "adm"          ADM's evaluator feeds float32 pixels in [0, 255] to the TF 2015 graph,
                 which resizes to 299 with TF1's legacy bilinear kernel (no half-pixel
                 offset: src = i * S / 299) and maps to (x - 128) / 128. The default: the
                 DiT / U-DiT papers' numbers come from it.
  "pytorch_fid"  pytorch-fid: x / 255, bilinear resize with half-pixel centres
                 (align_corners=False, src = (i + 0.5) * S / 299 - 0.5, clamped at 0), 2x - 1.

Neither antialiases when shrinking (jax.image.resize would), so the resize is written out:
per axis, a gather of the two neighbours and a linear blend, with indices and weights
computed in float32 as the reference kernels do.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

INCEPTION_SIZE = 299
MODES = ("adm", "pytorch_fid")


def check_images(images, what: str = "images") -> None:
    """Raises ValueError unless `images` is uint8 [N, H, W, 3] (ADM's sample layout)."""
    shape = np.shape(images)
    dtype = np.asarray(images[:0]).dtype if hasattr(images, "__getitem__") else None
    if len(shape) != 4:
        raise ValueError(f"{what} must be [N, H, W, 3] (NHWC), got shape {shape}")
    if shape[-1] != 3:
        hint = (" (grayscale: repeat the channel, np.repeat(x, 3, axis=-1))" if shape[-1] == 1
                else " (channels-first? transpose NCHW -> NHWC)" if shape[1] == 3 else "")
        raise ValueError(f"{what} must have 3 (RGB) channels last, got shape {shape}{hint}")
    if dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 in [0, 255] (ADM's sample layout), got {dtype}. Convert "
            "model outputs in [-1, 1] as ADM does: np.clip(127.5 * x + 128, 0, 255)"
            ".astype(np.uint8); images in [0, 1]: np.round(255 * x).astype(np.uint8)")
    if shape[1] < 2 or shape[2] < 2:
        raise ValueError(f"{what} are {shape[1]}x{shape[2]}; need at least 2x2 pixels")


def _axis_taps(size_in: int, size_out: int, mode: str):
    """(i0, i1, lam) int32/float32 [size_out]: out[i] = blend of in[i0], in[i1] by lam."""
    i = np.arange(size_out, dtype=np.float32)
    scale = np.float32(size_in) / np.float32(size_out)
    if mode == "adm":
        src = i * scale
    else:
        src = np.maximum((i + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def _resize_axis(x: jax.Array, axis: int, size_out: int, mode: str) -> jax.Array:
    size_in = x.shape[axis]
    if size_in == size_out:
        return x  # both conventions are the identity at equal size
    i0, i1, lam = _axis_taps(size_in, size_out, mode)
    shape = [1] * x.ndim
    shape[axis] = size_out
    lam = jnp.asarray(lam).reshape(shape)
    x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
    x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
    if mode == "adm":  # TF: top + (bottom - top) * lerp
        return x0 + (x1 - x0) * lam
    return (1 - lam) * x0 + lam * x1  # torch: w0 * x0 + w1 * x1


def resize_bilinear(x: jax.Array, size: int, mode: str) -> jax.Array:
    """x: [B, H, W, C] float32 -> [B, size, size, C]; along W, then H (as TF's kernel)."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {MODES}")
    return _resize_axis(_resize_axis(x, 2, size, mode), 1, size, mode)


def preprocess(images: jax.Array, mode: str = "adm", size: int = INCEPTION_SIZE) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 Inception input [B, size, size, 3] under `mode`.

    Shape checks only (jit-safe); host code should call `check_images` first.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    x = images.astype(jnp.float32)
    if mode == "adm":
        return (resize_bilinear(x, size, mode) - 128.0) * (1.0 / 128.0)
    if mode == "pytorch_fid":
        return 2.0 * resize_bilinear(x / 255.0, size, mode) - 1.0
    raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {MODES}")
