"""ADM's batch files: read sample / reference `.npz`, and write reference statistics.

Layout (guided-diffusion's evaluations, e.g. VIRTUAL_imagenet256_labeled.npz):
  arr_0             uint8 [N, H, W, 3] images (samples: 50,000; ImageNet-256 reference: 10,000);
                    [N, H, W, 1] (grayscale samples, e.g. Fashion-MNIST) is read as RGB
  mu, sigma         pool3 statistics [2048], [2048, 2048]
  mu_s, sigma_s     spatial (sFID) statistics [2023], [2023, 2023]
If `mu` is present the four stored arrays are the reference statistics; otherwise they are
computed from arr_0. Other keys are ignored. arr_0 is streamed from the archive in batches,
never loaded whole (50,000 images at 256 are ~10 GB).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import zipfile
from typing import Iterator

import numpy as np
from etils import epath

from udit_jax.evaluation.metrics import Statistics, feature_statistics

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class ImageArrayInfo:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def count(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]


def _require_file(path: str | os.PathLike, what: str) -> epath.Path:
    """Local or cloud (gs://...) path of an existing .npz archive."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with path.open("rb") as f:
        if not zipfile.is_zipfile(f):
            raise ValueError(f"{what} {path} is not an .npz archive (np.savez output expected)")
    return path


def npz_keys(path: str | os.PathLike) -> list[str]:
    with _require_file(path, "batch file").open("rb") as f, zipfile.ZipFile(f) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


@contextlib.contextmanager
def _open_member(path: epath.Path, key: str):
    with path.open("rb") as raw, zipfile.ZipFile(raw) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise ValueError(f"{path} has no {key!r} array (keys: {npz_keys(path)})")
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}:{key} uses .npy format {version}; re-save it with "
                                 "np.savez")
            if fortran:
                raise ValueError(f"{path}:{key} is stored in Fortran order; re-save it with "
                                 "np.savez(path, arr_0=np.ascontiguousarray(x))")
            yield f, ImageArrayInfo(tuple(shape), dtype)


def image_array_info(path: str | os.PathLike, key: str = IMAGES_KEY) -> ImageArrayInfo:
    """Shape and dtype of `key` from the archive header (no data read)."""
    with _open_member(_require_file(path, "batch file"), key) as (_, info):
        return info


def check_image_array(info: ImageArrayInfo, path) -> None:
    """ADM's arr_0 contract: uint8 [N, H, W, 3] (or grayscale [N, H, W, 1]), N >= 1."""
    what = f"{path} ({IMAGES_KEY})"
    if len(info.shape) != 4:
        raise ValueError(f"{what} must be [N, H, W, 3] (NHWC), got shape {info.shape}")
    if info.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have 3 (RGB) or 1 (grayscale) channels last, got shape "
                         f"{info.shape}")
    if info.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 in [0, 255], got {info.dtype}; save samples as "
                         "np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)")
    if info.count < 1:
        raise ValueError(f"{what} holds no images")


def iter_images(path: str | os.PathLike, batch_size: int = 1000,
                key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
    """Consecutive uint8 batches [<=batch_size, H, W, 3] of `key`, streamed from the archive
    (grayscale images repeated to RGB, as Inception sees them)."""
    path = _require_file(path, "batch file")
    with _open_member(path, key) as (f, info):
        check_image_array(info, path)
        per_image = int(np.prod(info.shape[1:])) * info.dtype.itemsize
        for start in range(0, info.count, batch_size):
            n = min(batch_size, info.count - start)
            data = f.read(n * per_image)
            if len(data) != n * per_image:
                raise ValueError(f"{path}:{key} is truncated at image {start}")
            images = np.frombuffer(data, info.dtype).reshape((n,) + info.shape[1:])
            yield np.repeat(images, 3, axis=-1) if info.shape[-1] == 1 else images


def load_statistics(path: str | os.PathLike) -> tuple[Statistics, Statistics] | None:
    """(pool3, spatial) statistics stored in an ADM reference file, or None without 'mu'."""
    path = _require_file(path, "reference file")
    keys = npz_keys(path)
    if "mu" not in keys:
        return None
    missing = [k for k in STAT_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path} has 'mu' but lacks {missing}: a reference file carries all of "
                         f"{STAT_KEYS} (or none, and statistics are computed from arr_0)")
    with path.open("rb") as f, np.load(f) as data:
        pool, spatial = (Statistics(data["mu"], data["sigma"]),
                         Statistics(data["mu_s"], data["sigma_s"]))
    for name, st in (("mu/sigma", pool), ("mu_s/sigma_s", spatial)):
        d = st.mu.shape[0] if st.mu.ndim == 1 else -1
        if d < 0 or st.sigma.shape != (d, d):
            raise ValueError(f"{path}: {name} have shapes {st.mu.shape} / {st.sigma.shape}; "
                             "expected [D] and [D, D]")
    return pool, spatial


def write_reference(path: str | os.PathLike, pool3: np.ndarray, spatial: np.ndarray,
                    images: np.ndarray | None = None) -> None:
    """Writes an ADM-layout reference file: statistics of the given features (float32
    features; mu float32, sigma float64 as ADM computes them) and, optionally, the images
    themselves as arr_0 (needed for precision/recall)."""
    write_statistics(path, feature_statistics(pool3), feature_statistics(spatial), images)


def write_statistics(path: str | os.PathLike, pool: Statistics, spat: Statistics,
                     images: np.ndarray | None = None) -> None:
    """Writes an ADM-layout reference file from (pool3, spatial) statistics and optional
    images (arr_0)."""
    arrays = {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spat.mu, "sigma_s": spat.sigma}
    if images is not None:
        arrays[IMAGES_KEY] = np.asarray(images)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
