"""Training input pipelines (grain) with exact, process-count independent resume.

    loader = make_loader(config, global_batch_size=256, seed=0, workdir=workdir)
    batch = next(loader)             # this process's slice: {mean, std, label} or {image, label}
    state = loader.get_state()       # JSON-able; identical on every process -> checkpoint it
    loader.set_state(state)          # the next batch is the one that followed the saved state
    batch = to_global_batch(mesh, batch)                       # global jax.Arrays on the mesh
    latents = sample_latents(batch, key, vae.scaling_factor)   # on device, inside the train step

The example stream. Position g = 0, 1, 2, ... of the global stream is slot g % N of epoch
g // N (N examples); each epoch has its own seeded permutation of the records and its own
flip bits. Global batch b is positions [b*G, (b+1)*G); process p of P reads its G/P
consecutive positions of it. Epoch boundaries do not align with batches: a batch may hold the
end of one epoch and the start of the next, so every example is seen once per epoch.

Resume rule. The state is the number of stream positions consumed globally
(`examples_seen`), plus the seed and N to check that the same stream is meant. Restoring
continues at exactly that position with any number of processes and any global batch size
(G must stay divisible by P); only changing the seed or the dataset breaks the stream, and
set_state refuses that.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from udit_jax.data import preprocess
from udit_jax.data.latents import LatentCache, cache_dir_from_config, check_cache_matches
from udit_jax.data.sources import Source, check_num_classes, read_with_retry, source_from_config

STATE_VERSION = 1


class ExampleTable(Protocol):
    """Random-access examples: get_batch(records [n], flips [n] bool) -> dict of [n, ...] arrays."""

    def __len__(self) -> int: ...

    def get_batch(self, records: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]: ...


# ------------------------------------------------------------------------------------------
# The example order: a pure function of (seed, position)

@functools.lru_cache(maxsize=4)  # a batch spans at most two epochs
def _epoch_order(seed: int, epoch: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    records = rng.permutation(num_examples)
    flips = rng.integers(0, 2, num_examples).astype(bool)
    records.flags.writeable = flips.flags.writeable = False
    return records, flips


def example_order(positions: np.ndarray, num_examples: int, seed: int,
                  random_flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Global stream positions [n] -> (record indices [n], flip choices [n] bool)."""
    positions = np.asarray(positions, np.int64)
    epochs, slots = np.divmod(positions, num_examples)
    records = np.empty_like(positions)
    flips = np.zeros(positions.shape, bool)
    for epoch in np.unique(epochs):
        order, epoch_flips = _epoch_order(seed, int(epoch), num_examples)
        here = epochs == epoch
        records[here] = order[slots[here]]
        if random_flip:
            flips[here] = epoch_flips[slots[here]]
    return records, flips


@dataclasses.dataclass(frozen=True)
class _BatchReader:
    """Local batch number k (counted from `start`) -> this process's batch. Picklable for workers."""

    table: Any
    seed: int
    random_flip: bool
    start: int
    global_batch_size: int
    process_index: int
    process_count: int

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        local = self.global_batch_size // self.process_count
        first = self.start + k * self.global_batch_size + self.process_index * local
        records, flips = example_order(np.arange(first, first + local), len(self.table), self.seed,
                                       self.random_flip)
        return self.table.get_batch(records, flips)


# ------------------------------------------------------------------------------------------
# The loader

class Loader:
    """Infinite iterator over this process's slices of global batches (numpy dicts).

    Batches are produced by a grain pipeline: `num_threads` threads read batches ahead (up to
    `prefetch_batches`), optionally in `num_workers` worker processes. The order never depends
    on threads or workers.
    """

    def __init__(self, table: ExampleTable, *, global_batch_size: int, seed: int,
                 random_flip: bool = True, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 8, prefetch_batches: int = 4,
                 num_workers: int = 0):
        self.table = table
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size <= 0 or global_batch_size % self.process_count:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                             f"the {self.process_count} processes")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        if len(table) == 0:
            raise ValueError("the example table is empty")
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.random_flip = random_flip
        self.num_threads, self.prefetch_batches, self.num_workers = num_threads, prefetch_batches, num_workers
        self.examples_seen = 0
        self._iterator = None

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.examples_seen / len(self.table)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.examples_seen += self.global_batch_size
        return batch

    def _start(self):
        import grain

        reader = _BatchReader(self.table, self.seed, self.random_flip, self.examples_seen,
                              self.global_batch_size, self.process_index, self.process_count)
        dataset = grain.MapDataset.range(0, 2 ** 62).map(reader).to_iter_dataset(
            # grain runs at most prefetch_buffer_size reads at once, so it is at least the threads.
            grain.ReadOptions(num_threads=self.num_threads,
                              prefetch_buffer_size=max(self.prefetch_batches, self.num_threads)))
        if self.num_workers:
            from absl import flags
            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app
                flags.FLAGS.mark_as_parsed()  # (tests, notebooks) their defaults are what we want
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=max(1, self.prefetch_batches // self.num_workers)))
        return iter(dataset)

    def get_state(self) -> dict[str, int]:
        """JSON-able and identical on every process (save it once, e.g. with orbax JsonSave)."""
        return {"version": STATE_VERSION, "examples_seen": self.examples_seen, "seed": self.seed,
                "num_examples": len(self.table)}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue after `state` (from get_state, any process count or global batch size)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["num_examples"] != len(self.table) or state["seed"] != self.seed:
            raise ValueError(
                f"the saved loader state is for seed {state['seed']} over {state['num_examples']} examples "
                f"but this loader has seed {self.seed} over {len(self.table)}: restore with the same "
                "data and seed as the checkpointed run (or start a new run)")
        self.close()
        self.examples_seen = int(state["examples_seen"])

    def close(self) -> None:
        """Stops prefetching threads/workers; iteration restarts where it stopped."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


# ------------------------------------------------------------------------------------------
# Pixel-space examples

class ImageTable:
    """In-memory uint8 images [N, S, S, C] and labels [N].

    get_batch -> {image float32 [n, S, S, C] in [-1, 1] (mirrored where flips), label int32 [n]}.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"ImageTable needs uint8 images [N, S, S, C] and N labels, got "
                             f"{images.dtype} {images.shape} and {len(labels)} labels")
        labels = np.asarray(labels, np.int32)
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if outside.size:
            raise ValueError(f"labels {sorted(set(outside.tolist()))[:10]} are outside [0, "
                             f"{num_classes}); check data.num_classes")
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, records: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]:
        images = self.images[records]
        images = np.where(flips[:, None, None, None], preprocess.hflip(images), images)
        return {"image": preprocess.to_unit_range(images), "label": self.labels[records]}


def _pixels_of(source: Source, index: int, image_size: int, min_side: int, max_pixels: int | None):
    """Arrays no larger than image_size (Fashion-MNIST) keep their channels and are padded with
    black (-1); anything else is decoded to RGB and ADM-centre-cropped."""
    try:
        payload, label = read_with_retry(source, index)
        if isinstance(payload, np.ndarray) and max(payload.shape[:2]) <= image_size:
            pixels = payload if payload.ndim == 3 else payload[..., None]
            return preprocess.pad_to(pixels, image_size), label, ""
        image = preprocess.load_rgb(payload, min_side=min_side, max_pixels=max_pixels)
        return preprocess.center_crop_arr(image, image_size), label, ""
    except (preprocess.BadImageError, OSError) as e:
        return None, -1, str(e) or type(e).__name__


def image_table_from_source(source: Source, image_size: int, *, min_image_side: int = 16,
                            max_image_pixels: int | None = 2 ** 27, max_bad_fraction: float = 0.001,
                            decode_threads: int = 8) -> ImageTable:
    """Decodes a (small) source into memory for pixel-space training, skipping bad files."""
    with concurrent.futures.ThreadPoolExecutor(decode_threads) as pool:
        results = list(pool.map(lambda i: _pixels_of(source, i, image_size, min_image_side,
                                                     max_image_pixels), range(len(source))))
    bad = [(source.key(i), reason) for i, (pixels, _, reason) in enumerate(results) if pixels is None]
    for key, reason in bad:
        logging.warning("skipping %s: %s", key, reason)
    if len(bad) > max_bad_fraction * len(source):
        raise ValueError(f"{len(bad)} of {len(source)} images are unreadable, more than "
                           f"data.max_bad_fraction={max_bad_fraction} allows (e.g. {bad[:5]})")
    good = [(pixels, label) for pixels, label, _ in results if pixels is not None]
    if not good:
        raise ValueError(f"no usable images in {source.describe()}")
    channels = {pixels.shape[-1] for pixels, _ in good}
    if len(channels) > 1:
        raise ValueError(f"images with different channel counts {sorted(channels)} in one source")
    return ImageTable(np.stack([p for p, _ in good]), np.asarray([l for _, l in good]), source.num_classes)


# ------------------------------------------------------------------------------------------
# Config entry point and device-side helpers

def make_loader(config, *, global_batch_size: int, seed: int, workdir: str) -> Loader:
    """The training loader for config.data.space ('latent': the VAE cache; 'pixel': images).

    Fields read: data.space, data.num_classes (the source's or cache's class count must be it),
    data.random_flip, data.loader_threads, data.prefetch_batches, data.loader_workers; for
    'latent' data.cache_dir (default <workdir>/latents), data.image_size, data.latent_scale,
    vae.weights / vae.arguments (compared with the cache's VAE when set); for 'pixel' the
    source fields (see sources.source_from_config), data.image_size, data.min_image_side,
    data.max_image_pixels, data.max_bad_fraction, data.decode_threads.
    """
    data = config.data
    space = data.space
    if space == "latent":
        table = LatentCache(cache_dir_from_config(config, workdir))
        check_cache_matches(table, config)
    elif space == "pixel":
        source = source_from_config(data)
        check_num_classes(source, data.num_classes)
        table = image_table_from_source(
            source, data.image_size, min_image_side=data.min_image_side,
            max_image_pixels=data.max_image_pixels, max_bad_fraction=data.max_bad_fraction,
            decode_threads=data.decode_threads)
        channels = table.images.shape[-1]
        if channels != data.channels:   # else the model's first conv fails at compile time
            raise ValueError(f"data.channels={data.channels} but the images of "
                             f"data.source={data.source!r} have {channels} channel(s); set "
                             f"--config.data.channels={channels}")
    else:
        raise ValueError(f"data.space={space!r} is unknown; use 'latent' or 'pixel'")
    return Loader(table, global_batch_size=global_batch_size, seed=seed,
                  random_flip=data.random_flip, num_threads=data.loader_threads,
                  prefetch_batches=data.prefetch_batches, num_workers=data.loader_workers)


def to_global_batch(mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's numpy batch -> global jax.Arrays sharded over the mesh's data axes."""
    from udit_jax.parallel import global_batch_from_local

    local_devices = len(mesh.local_devices)
    for name, value in batch.items():
        if len(value) % local_devices:
            raise ValueError(f"this process's batch of {len(value)} ('{name}') does not split over its "
                             f"{local_devices} devices; make the global batch size a multiple of the "
                             f"device count ({mesh.size})")
    return {name: global_batch_from_local(mesh, value) for name, value in batch.items()}


def sample_latents(batch: dict[str, jax.Array], key: jax.Array, scale: float) -> jax.Array:
    """Diffusion latents from cached posterior parameters: (mean + std * eps) * scale, float32.

    batch: {'mean', 'std'} [B, h, w, C] (any float dtype); key: the train step's PRNG key.
    """
    mean = batch["mean"].astype(jnp.float32)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean + batch["std"].astype(jnp.float32) * eps) * scale
