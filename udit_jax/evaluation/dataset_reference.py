"""Reference statistics of a training dataset (any source the data pipeline reads), ADM layout.

    python -m udit_jax.main --mode=evaluate --config=... --workdir=... \
        --config.eval.write_reference_to=ref_imagenet256.npz    (see evaluate_from_config)

    from udit_jax.evaluation import write_dataset_reference
    write_dataset_reference(config, "ref.npz", "pt_inception-2015-12-05-6726825d.pth",
                            max_images=50_000)

Images are the training pixels: config.data's source (class folders, tfds, Fashion-MNIST),
decoded and ADM-centre-cropped to config.data.image_size exactly as the pixel training loader
does (arrays no larger than image_size, i.e. Fashion-MNIST, are padded with black instead),
unflipped, as uint8. One channel is repeated to RGB for Inception, as grayscale samples are
when scored. Unreadable files are skipped (and counted), as in training.

Statistics are accumulated in float64 over chunks, so a whole ImageNet train split needs
memory for one chunk only; mu is stored as float32 and sigma as float64 (ADM's dtypes).
"""

from __future__ import annotations

import concurrent.futures
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from udit_jax.evaluation import reference as R
from udit_jax.evaluation.metrics import Statistics

CHUNK_IMAGES = 4096  # images decoded and featurised at a time


class MomentAccumulator:
    """Running sum and sum of outer products of feature rows (float64) -> Statistics."""

    def __init__(self):
        self.count, self.total, self.outer = 0, None, None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if self.total is None:
            self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def statistics(self) -> Statistics:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return Statistics(mu.astype(np.float32), sigma)


def _dataset_pixels(source, index: int, image_size: int, min_side: int, max_pixels):
    """uint8 [S, S, 3] of item `index` as the pixel training loader makes it, or None if bad."""
    from udit_jax.data.loader import _pixels_of  # the training loader's own decode/crop/pad
    pixels, _, reason = _pixels_of(source, index, image_size, min_side, max_pixels)
    if pixels is None:
        logging.warning("skipping %s: %s", source.key(index), reason)
        return None
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def select_indices(num_items: int, max_images: int | None, seed: int) -> np.ndarray:
    """All item indices, or a seeded uniform subset of max_images of them (sorted, for locality)."""
    if max_images is None or max_images >= num_items:
        return np.arange(num_items)
    if max_images < 2:
        raise ValueError(f"max_images={max_images}: a covariance needs at least 2 images")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_items, max_images, replace=False))


def write_dataset_reference(config, out_path, inception_weights, *, max_images: int | None = None,
                            seed: int = 0, with_images: bool = False, preprocess: str = "adm",
                            batch_size: int = 256, dtype: str = "float32",
                            mesh: jax.sharding.Mesh | None = None, decode_threads: int = 8,
                            progress: bool = True) -> dict:
    """Writes the reference .npz (mu, sigma, mu_s, sigma_s; with_images: also arr_0, uint8
    [N, S, S, 3], which precision/recall need, held in memory: use it with max_images) of
    config.data's dataset and returns a summary.

    config.data fields: the source fields (source, dir, split, tfds_name), image_size,
    min_image_side [16], max_image_pixels [2**27]. max_images: a uniform random subset of
    that many items (drawn from `seed`; None = every item). Every process computes the same
    features; process 0 writes the file.
    """
    from udit_jax.data.sources import source_from_config
    from udit_jax.evaluation.inception_weights import load_inception_variables
    from udit_jax.evaluation.features import DTYPES, InceptionFeatures

    t0 = time.time()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {tuple(DTYPES)}")
    data = config.data
    image_size = int(data.image_size)
    source = source_from_config(data)   # a missing dataset fails before the network loads
    indices = select_indices(len(source), max_images, seed)
    features = InceptionFeatures(load_inception_variables(inception_weights), preprocess,
                                 batch_size, mesh, dtype=DTYPES[dtype],
                                 precision="highest" if dtype == "float32" else None)
    pool_stats, spatial_stats = MomentAccumulator(), MomentAccumulator()
    kept, bad = [], 0
    min_side, max_pixels = data.min_image_side, data.max_image_pixels

    def chunks():
        """(uint8 images [n, S, S, 3] of the readable items, items read) per chunk."""
        with concurrent.futures.ThreadPoolExecutor(decode_threads) as executor:
            for start in range(0, len(indices), CHUNK_IMAGES):
                part = indices[start:start + CHUNK_IMAGES]
                images = [p for p in executor.map(
                    lambda i: _dataset_pixels(source, int(i), image_size, min_side, max_pixels),
                    part) if p is not None]
                yield images, len(part)

    show = progress and jax.process_index() == 0
    with tqdm(total=len(indices), desc="reference images", unit="img", disable=not show) as bar:
        for images, num_read in chunks():
            bad += num_read - len(images)
            if images:
                images = np.stack(images)
                acts = features(images)
                pool_stats.update(acts.pool3)
                spatial_stats.update(acts.spatial)
                if with_images:
                    kept.append(images)
            bar.update(num_read)
    stats = (pool_stats.statistics(), spatial_stats.statistics())
    if jax.process_index() == 0:
        R.write_statistics(out_path, *stats, images=np.concatenate(kept) if with_images else None)
        logging.info("wrote reference statistics of %d images (%d unreadable skipped) to %s",
                     pool_stats.count, bad, out_path)
    return {"path": str(out_path), "source": source.describe(), "image_size": image_size,
            "num_images": pool_stats.count, "num_unreadable": bad, "max_images": max_images,
            "seed": seed, "with_images": with_images, "preprocess": preprocess, "dtype": dtype,
            "seconds": round(time.time() - t0, 2)}
