"""Sharded Inception feature extraction: uint8 images -> pool3, spatial features, class probs.

Images are placed on a ('data', 'fsdp') mesh with the batch split over every device (each
process may hold the full batch; only its devices' rows are transferred); the network
weights are replicated. Batches are padded to a fixed size so that one compilation serves a
whole file.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from udit_jax import parallel
from udit_jax.evaluation.inception import InceptionV3
from udit_jax.evaluation.metrics import class_probabilities
from udit_jax.evaluation.preprocess import MODES, check_images, preprocess

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # Inception compute dtypes by name


@functools.lru_cache(maxsize=None)
def _compiled_forward(mode: str, dtype, precision):
    """One jitted forward per configuration, shared by every extractor (jit then caches one
    executable per batch shape and sharding), so a training loop recompiles nothing."""
    model = InceptionV3(dtype=dtype, precision=precision)

    def forward(variables, images):
        out = model.apply(variables, preprocess(images, mode))
        return out["pool3"], out["spatial"], class_probabilities(out["logits_unbiased"])

    return jax.jit(forward)


@dataclasses.dataclass(frozen=True)
class Activations:
    """Features of a set of N images (float32, host numpy)."""
    pool3: np.ndarray    # [N, 2048]  FID / precision-recall features
    spatial: np.ndarray  # [N, 2023]  sFID features ((h, w, c) order)
    probs: np.ndarray    # [N, 1008]  softmax of the bias-free logits (Inception Score)

    def __len__(self) -> int:
        return len(self.pool3)


class InceptionFeatures:
    """Callable: uint8 images [B, H, W, 3] -> Activations.

    variables: {'params', 'batch_stats'} from `load_inception_variables`.
    mode: preprocessing, "adm" (default; the papers' numbers) or "pytorch_fid".
    batch_size: global images per device step (rounded up to a multiple of the device count).
    dtype / precision: the network's compute dtype and matmul/conv precision.
    """

    def __init__(self, variables: dict, mode: str = "adm", batch_size: int = 256,
                 mesh: jax.sharding.Mesh | None = None, dtype=jnp.float32,
                 precision: str | None = "highest"):
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.mode = mode
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        self.variables = jax.device_put(variables, parallel.replicated(self.mesh))
        self._forward = _compiled_forward(mode, dtype, precision)

    def _place(self, batch: np.ndarray) -> jax.Array:
        sharding = parallel.batch_sharding(self.mesh, batch.ndim)
        return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])

    @staticmethod
    def _fetch(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def __call__(self, images: np.ndarray) -> Activations:
        images = np.asarray(images)
        check_images(images)
        parts = [self._run(images[s:s + self.batch_size])
                 for s in range(0, len(images), self.batch_size)]
        return Activations(*(np.concatenate(p) for p in zip(*parts)))

    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, ...]:
        n = len(chunk)
        if n < self.batch_size:  # pad to the compiled batch; padding rows are dropped below
            pad = np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        outs = self._forward(self.variables, self._place(chunk))
        return tuple(self._fetch(o)[:n] for o in outs)

    def from_batches(self, batches: Iterable[np.ndarray], total: int | None = None,
                     desc: str = "inception features", progress: bool = True) -> Activations:
        """Activations of a stream of uint8 batches (any sizes); tqdm bar over `total` images."""
        parts = []
        show = progress and jax.process_index() == 0
        with tqdm(total=total, desc=desc, unit="img", disable=not show) as bar:
            for batch in batches:
                batch = np.asarray(batch)
                check_images(batch)
                for s in range(0, len(batch), self.batch_size):
                    parts.append(self._run(batch[s:s + self.batch_size]))
                bar.update(len(batch))
        if not parts:
            raise ValueError(f"{desc}: no images")
        return Activations(*(np.concatenate(p) for p in zip(*parts)))
