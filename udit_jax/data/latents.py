"""The VAE latent cache: every image and its mirror encoded once, stored as posterior parameters.

    manifest = build_latent_cache(source, encode_fn, cache_dir, image_size=256, vae_identity=...)
    manifest = encode_dataset(config, workdir)        # the `--mode=encode` entry point
    cache = LatentCache(cache_dir)                    # cache[i] -> {mean, std [2, h, w, C], label, index}

Unlike the official feature extraction (one frozen flip and one frozen posterior sample per
image), each record keeps the posterior mean and std of the image and of its horizontal mirror,
so the loader still flips at random and the train step still samples the posterior.

Layout of `cache_dir`:
    spec.json                         what is being built (source, image size, VAE, dtype, ...)
    shard-00000-of-00042.array_record records of items [0, records_per_shard), in source order
    shard-00000-of-00042.json         written after the shard: its record count and skipped files
    manifest.json                     written last: counts, shapes, dtype, VAE, skipped files

Work is split into shards of consecutive source items; shard s belongs to process
s % process_count, which encodes it on its local devices. A shard is written to a temporary
file and renamed when complete, so an interrupted run keeps finished shards and rewrites only
the unfinished ones (with any number of processes); a re-run of a finished cache does nothing.
Multi-host: cache_dir must be a filesystem every host sees (NFS, or gs:// through etils.epath,
which needs gcsfs).

Record format (fixed size, little-endian): int64 label, int64 source index, then mean and std,
each [2, h, w, C] (index 0: the image, 1: its mirror) in the cache dtype.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from udit_jax.data import preprocess
from udit_jax.data.sources import Source, check_num_classes, read_with_retry, source_from_config

FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
# One record per chunk: each record can be read alone (the loader's global shuffle needs it).
WRITER_OPTIONS = "group_size:1,uncompressed"  # latents hardly compress; reading is faster
CACHE_DTYPES = ("float16", "float32")

# encode_fn(images [B, H, W, 3] float32 in [-1, 1]) -> (mean, std), each [B, h, w, C].
EncodeFn = Callable[[np.ndarray], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one cache record, as a numpy structured dtype."""

    latent_shape: tuple[int, int, int]
    dtype: str

    @property
    def struct(self) -> np.dtype:
        arrays = (np.dtype(self.dtype).newbyteorder("<"), (2,) + tuple(self.latent_shape))
        return np.dtype([("label", "<i8"), ("index", "<i8"), ("mean", *arrays), ("std", *arrays)])

    @property
    def nbytes(self) -> int:
        return self.struct.itemsize

    def encode(self, label: int, index: int, mean: np.ndarray, std: np.ndarray) -> bytes:
        """mean, std: [2, h, w, C] (image, mirror) -> record bytes."""
        record = np.zeros((), self.struct)
        record["label"], record["index"], record["mean"], record["std"] = label, index, mean, std
        return record.tobytes()

    def decode(self, records: list[bytes]) -> np.ndarray:
        """n records -> structured array [n] with fields label, index, mean/std [2, h, w, C]."""
        bad = [len(r) for r in records if len(r) != self.nbytes]
        if bad:
            raise ValueError(f"latent cache record of {bad[0]} bytes, expected {self.nbytes}; "
                             "the cache is corrupt or was written by another version")
        return np.frombuffer(b"".join(records), self.struct)


# ------------------------------------------------------------------------------------------
# Files. cache_dir may be local or remote (gs://... through etils.epath). Every file appears
# whole or not at all: local files are written under a temporary name and renamed; remote
# object stores publish an object only when its upload completes.

def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def _write_json(path: epath.Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, default=str)
    if not _is_local(path):
        path.write_text(text)
        return
    # Unique per process and host: processes on different hosts may share a pid.
    tmp = path.with_name(f".{path.name}.tmp{jax.process_index()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: epath.Path) -> Any:
    return json.loads(path.read_text())


def _shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


# Where things are, not what they are (fingerprints and hashes say that): hosts may mount the
# data or the VAE weights at different paths, and a resumed job may too.
_LOCATION_KEYS = frozenset({"root", "dir", "data_dir", "weights"})


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted((set(a) | set(b)) - _LOCATION_KEYS)
                for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _allgather_int(value: int) -> list[int]:
    """`value` of every process, in process order (one collective; [value] alone)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int64(value)))]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------
# Encoding

def vae_encode_fn(vae, params, devices=None) -> EncodeFn:
    """encode_fn for `build_latent_cache`: the VAE encoder, data-parallel over this process's devices.

    Each process encodes its own shards independently (no cross-host collectives), so the mesh
    holds only local devices. Returns (mean, std) as device arrays; std = exp(logvar / 2).
    """
    from udit_jax.models.vae import make_encode_fn
    from udit_jax.parallel import make_mesh, replicated

    mesh = make_mesh(devices=list(devices or jax.local_devices()))
    encode = make_encode_fn(vae, mesh)
    params = jax.device_put(params, replicated(mesh))
    std_of = jax.jit(lambda logvar: jnp.exp(0.5 * logvar))

    def encode_fn(images: np.ndarray):
        mean, logvar = encode(params, images)
        return mean, std_of(logvar)

    return encode_fn


def vae_identity(vae, params, weights: str | None = None) -> dict[str, Any]:
    """What makes latents comparable: the VAE's arguments and a hash of its parameters."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: str(kv[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    arguments = {f.name: getattr(vae, f.name) for f in dataclasses.fields(vae)
                 if f.name not in ("parent", "name")}
    return {"arguments": json.loads(json.dumps(arguments, default=str)), "weights": weights,
            "params_sha256": digest.hexdigest()[:16], "scaling_factor": float(vae.scaling_factor)}


@dataclasses.dataclass
class _Decoded:
    index: int
    label: int
    pixels: np.ndarray | None  # uint8 [S, S, 3]; None when the file is bad
    reason: str = ""


def _decode_item(source: Source, index: int, image_size: int, min_side: int,
                 max_pixels: int | None) -> _Decoded:
    try:
        payload, label = read_with_retry(source, index)
        image = preprocess.load_rgb(payload, min_side=min_side, max_pixels=max_pixels)
        return _Decoded(index, label, preprocess.center_crop_arr(image, image_size))
    except (preprocess.BadImageError, OSError) as e:
        return _Decoded(index, -1, None, str(e) or type(e).__name__)


def _decoded_in_order(pool: concurrent.futures.Executor, decode: Callable[[int], _Decoded],
                      indices: range, window: int) -> Iterator[_Decoded]:
    """decode(i) for i in indices, in order, with at most `window` items decoding ahead."""
    pending: collections.deque = collections.deque()
    for index in indices:
        pending.append(pool.submit(decode, index))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _ShardWriter:
    """Writes one shard to a temporary file; `commit` renames it and writes the shard's marker."""

    def __init__(self, cache_dir: epath.Path, shard: int, num_shards: int, start: int, stop: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.name = _shard_name(shard, num_shards)
        self.path = cache_dir / f"{self.name}.array_record"
        # Remote shards are written locally, then uploaded in one piece.
        local_dir = cache_dir if _is_local(cache_dir) else epath.Path(tempfile.mkdtemp(prefix="latents"))
        self.tmp = local_dir / f".{self.name}.array_record.tmp"
        if self.tmp.exists():  # left over from an interrupted run
            self.tmp.unlink()
        self.writer = ArrayRecordWriter(str(self.tmp), WRITER_OPTIONS)
        self.info = {"shard": shard, "start": start, "stop": stop, "num_records": 0, "skipped": [],
                     "latent_shape": None, "file": self.path.name}
        self.layout: RecordLayout | None = None

    def write(self, dtype: str, labels, indices, mean: np.ndarray, std: np.ndarray) -> None:
        """mean, std: [n, 2, h, w, C] for the n images `indices` with `labels`."""
        if self.layout is None:
            self.layout = RecordLayout(tuple(int(d) for d in mean.shape[2:]), dtype)
            self.info["latent_shape"] = list(self.layout.latent_shape)
        for label, index, m, s in zip(labels, indices, mean, std):
            self.writer.write(self.layout.encode(label, index, m, s))
        self.info["num_records"] += len(labels)

    def commit(self) -> dict[str, Any]:
        self.writer.close()
        if _is_local(self.path):
            os.replace(self.tmp, self.path)
        else:
            self.tmp.copy(self.path, overwrite=True)
            self.tmp.unlink()
            self.tmp.parent.rmdir()
        _write_json(self.path.with_suffix(".json"), self.info)
        return self.info


def build_latent_cache(source: Source, encode_fn: EncodeFn, cache_dir: str | os.PathLike, *,
                       image_size: int, vae_identity: dict[str, Any], dtype: str = "float16",
                       records_per_shard: int = 4096, batch_size: int = 64,
                       max_bad_fraction: float = 0.001, min_image_side: int = 16,
                       max_image_pixels: int | None = 2 ** 27, decode_threads: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Encodes `source` (both flips of every image) into `cache_dir`; returns the manifest.

    Each process (jax.process_index() of jax.process_count()) encodes the shards s with
    s % process_count == process_index, `batch_size` images (plus their mirrors) per
    encode_fn call. Bad files are skipped and listed; if more than `max_bad_fraction` of all
    items are bad the job raises (finished shards are kept; no manifest is written). Calling
    again resumes; calling after completion returns the existing manifest.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"data.cache_dtype={dtype!r} is not supported; use one of {CACHE_DTYPES}")
    if records_per_shard <= 0 or batch_size <= 0:
        raise ValueError(f"records_per_shard ({records_per_shard}) and batch_size ({batch_size}) "
                         "must be positive")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"data.max_bad_fraction={max_bad_fraction} must be in [0, 1]")
    cache_dir = epath.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    num_items = len(source)
    if num_items == 0:
        raise ValueError(f"the data source {source.describe()} is empty")
    num_shards = -(-num_items // records_per_shard)
    spec = {"format_version": FORMAT_VERSION, "source": source.describe(), "image_size": image_size,
            "vae": vae_identity, "dtype": dtype, "records_per_shard": records_per_shard,
            "num_shards": num_shards, "min_image_side": min_image_side,
            "max_image_pixels": max_image_pixels}
    spec = json.loads(json.dumps(spec, default=str))
    spec_path = cache_dir / SPEC_FILE
    if jax.process_index() == 0 and not spec_path.exists():
        _write_json(spec_path, spec)
    _barrier(f"latent-cache-spec-{cache_dir}")
    differing = _diff_keys(_read_json(spec_path), spec)
    if differing:
        raise ValueError(f"{cache_dir} holds a latent cache built with other settings (differing: "
                         f"{differing}); set data.cache_dir to a new directory or delete {cache_dir}")
    manifest_path = cache_dir / MANIFEST_FILE
    if manifest_path.exists():
        logging.info("latent cache %s is complete; nothing to do", cache_dir)
        return _read_json(manifest_path)

    process, num_processes = jax.process_index(), jax.process_count()
    shards = [s for s in range(process, num_shards, num_processes)
              if not (cache_dir / f"{_shard_name(s, num_shards)}.json").exists()]
    ranges = {s: range(s * records_per_shard, min((s + 1) * records_per_shard, num_items)) for s in shards}
    logging.info("encoding %d of %d shards in process %d of %d", len(shards), num_shards, process,
                 num_processes)
    allowed_bad = int(max_bad_fraction * num_items)
    decode = lambda i: _decode_item(source, i, image_size, min_image_side, max_image_pixels)
    threads = decode_threads or os.cpu_count() or 1

    from tqdm import tqdm
    bar = tqdm(total=sum(len(r) for r in ranges.values()), unit="img", disable=not progress,
               desc=f"encode (process {process}/{num_processes})", smoothing=0.05)
    skipped_here = 0
    over_limit = False   # this process saw more bad files than the whole job allows
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for shard in shards:
            writer = _ShardWriter(cache_dir, shard, num_shards, ranges[shard].start, ranges[shard].stop)
            batches = _batches(_decoded_in_order(pool, decode, ranges[shard], 2 * batch_size + threads),
                               batch_size, writer.info["skipped"], source, bar)
            in_flight = None  # (batch, device result): write one batch while the next encodes
            for batch in batches:
                result = _encode_both_flips(encode_fn, batch, batch_size)
                if in_flight is not None:
                    _write_batch(writer, dtype, *in_flight)
                in_flight = (batch, result)
            if in_flight is not None:
                _write_batch(writer, dtype, *in_flight)
            writer.commit()
            skipped_here += len(writer.info["skipped"])
            if skipped_here > allowed_bad:
                over_limit = True
                break
    bar.close()

    # Every process learns whether any stopped over the limit before anyone raises: a process
    # raising alone would leave the others waiting at the next barrier forever.
    skipped_per_process = _allgather_int(skipped_here if over_limit else -1)
    if max(skipped_per_process) >= 0:
        worst = int(np.argmax(skipped_per_process))
        if over_limit:
            raise _too_many_bad(cache_dir, skipped_here, num_items, max_bad_fraction,
                                writer.info["skipped"])
        raise ValueError(f"process {worst} stopped the latent cache job: it found "
                         f"{skipped_per_process[worst]} unreadable images, more than "
                         f"data.max_bad_fraction={max_bad_fraction} of {num_items} allows (its "
                         "log lists them). Finished shards are kept")
    _barrier(f"latent-cache-shards-{cache_dir}")
    if process == 0:
        manifest = _assemble_manifest(cache_dir, spec, source)
        if manifest["num_skipped"] <= allowed_bad:
            _write_json(manifest_path, manifest)
    _barrier(f"latent-cache-manifest-{cache_dir}")
    if not manifest_path.exists():
        manifest = _assemble_manifest(cache_dir, spec, source)
        raise _too_many_bad(cache_dir, manifest["num_skipped"], num_items, max_bad_fraction,
                            manifest["skipped"])
    manifest = _read_json(manifest_path)
    logging.info("latent cache %s: %d records, %d skipped files", cache_dir, manifest["num_records"],
                 manifest["num_skipped"])
    return manifest


def _batches(decoded: Iterator[_Decoded], batch_size: int, skipped: list, source: Source,
             bar) -> Iterator[list[_Decoded]]:
    """Groups good items into lists of batch_size (the last may be shorter); records bad ones."""
    batch = []
    for item in decoded:
        bar.update(1)
        if item.pixels is None:
            skipped.append({"index": item.index, "file": source.key(item.index), "reason": item.reason})
            logging.warning("skipping %s: %s", source.key(item.index), item.reason)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_both_flips(encode_fn: EncodeFn, batch: list[_Decoded], batch_size: int):
    """Images and mirrors in one call of a fixed size 2 * batch_size (padded), so it compiles once."""
    x = np.zeros((batch_size, *batch[0].pixels.shape), np.float32)
    x[:len(batch)] = preprocess.to_unit_range(np.stack([item.pixels for item in batch]))
    return encode_fn(np.concatenate([x, preprocess.hflip(x)]))


def _write_batch(writer: _ShardWriter, dtype: str, batch: list[_Decoded], result) -> None:
    mean, std = (np.asarray(a, np.float32) for a in result)
    n, half = len(batch), mean.shape[0] // 2
    both = lambda a: np.stack([a[:n], a[half:half + n]], axis=1)  # [n, 2, h, w, C]
    writer.write(dtype, [item.label for item in batch], [item.index for item in batch],
                 both(mean), both(std))


def _assemble_manifest(cache_dir: epath.Path, spec: dict, source: Source) -> dict[str, Any]:
    shards, missing = [], []
    for s in range(spec["num_shards"]):
        marker = cache_dir / f"{_shard_name(s, spec['num_shards'])}.json"
        if not marker.exists():
            missing.append(marker.name)
            continue
        shards.append(_read_json(marker))
    if missing:
        raise ValueError(f"latent cache {cache_dir}: shards {missing[:5]} (of {len(missing)}) are "
                           "not finished after every process completed; is cache_dir on a filesystem "
                           "all hosts share? Re-run the encode job to finish them")
    shapes = {tuple(s["latent_shape"]) for s in shards if s["latent_shape"] is not None}
    if len(shapes) > 1:
        raise RuntimeError(f"latent cache {cache_dir}: shards disagree on the latent shape {shapes}")
    skipped = [item for s in shards for item in s["skipped"]]
    return {"format_version": FORMAT_VERSION, "spec": spec, "num_items": spec["source"]["num_items"],
            "num_records": sum(s["num_records"] for s in shards), "num_skipped": len(skipped),
            "skipped": skipped, "image_size": spec["image_size"], "dtype": spec["dtype"],
            "latent_shape": list(shapes.pop()) if shapes else None, "vae": spec["vae"],
            "num_classes": source.num_classes, "class_names": list(source.class_names),
            "shards": [{"file": s["file"], "num_records": s["num_records"]} for s in shards]}


def _too_many_bad(cache_dir, num_bad: int, num_items: int, max_bad_fraction: float,
                  examples: list) -> ValueError:
    listing = "; ".join(f"{e['file']}: {e['reason']}" for e in examples[:5])
    return ValueError(
        f"{num_bad} of {num_items} images are unreadable, more than data.max_bad_fraction="
        f"{max_bad_fraction} allows (e.g. {listing}). Finished shards in {cache_dir} are kept: fix "
        "data.dir, or raise data.max_bad_fraction and re-run to finish without re-encoding them")


# ------------------------------------------------------------------------------------------
# Reading

class LatentCache:
    """Random access to a finished latent cache.

    cache[i] -> {label, index, mean [2, h, w, C], std [2, h, w, C]} (flip 0: image, 1: mirror);
    cache.get_batch(records, flips) -> {mean [n, h, w, C], std [n, h, w, C], label int32 [n]}.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.cache_dir = epath.Path(cache_dir)
        manifest_path = self.cache_dir / MANIFEST_FILE
        if not manifest_path.exists():
            raise FileNotFoundError(f"no finished latent cache in {self.cache_dir} ({MANIFEST_FILE} is "
                                    "missing); build it with `python -m udit_jax.main --mode=encode "
                                    "--config=... --workdir=...` (same data.cache_dir)")
        self.manifest = _read_json(manifest_path)
        if self.manifest["format_version"] != FORMAT_VERSION:
            raise ValueError(f"latent cache {self.cache_dir} has format version "
                             f"{self.manifest['format_version']}, this code reads {FORMAT_VERSION}; re-encode it")
        if not self.manifest["num_records"]:
            raise ValueError(f"latent cache {self.cache_dir} holds no records")
        self.layout = RecordLayout(tuple(self.manifest["latent_shape"]), self.manifest["dtype"])
        self.num_classes = self.manifest["num_classes"]
        paths = [str(self.cache_dir / s["file"]) for s in self.manifest["shards"] if s["num_records"]]
        self._source = ArrayRecordDataSource(paths)
        if len(self._source) != self.manifest["num_records"]:
            raise ValueError(f"latent cache {self.cache_dir}: shards hold {len(self._source)} records, "
                             f"the manifest says {self.manifest['num_records']}; re-encode it")

    def __len__(self) -> int:
        return self.manifest["num_records"]

    def __getitem__(self, record: int) -> dict[str, Any]:
        parsed = self.layout.decode([self._source[record]])[0]
        return {"label": int(parsed["label"]), "index": int(parsed["index"]), "mean": parsed["mean"],
                "std": parsed["std"]}

    def get_batch(self, records: np.ndarray, flips: np.ndarray) -> dict[str, np.ndarray]:
        parsed = self.layout.decode(self._source.__getitems__([int(r) for r in records]))
        rows, sides = np.arange(len(parsed)), np.asarray(flips, np.intp)
        return {"mean": parsed["mean"][rows, sides], "std": parsed["std"][rows, sides],
                "label": parsed["label"].astype(np.int32)}


# ------------------------------------------------------------------------------------------
# Config entry point

def cache_dir_from_config(config, workdir: str) -> str:
    """data.cache_dir, or <workdir>/latents when it is empty (encode and train agree on it)."""
    return config.data.cache_dir or os.path.join(workdir, "latents")


def check_cache_matches(cache: LatentCache, config) -> None:
    """Raises ValueError when a finished latent cache was built for another config: image
    size, class count, latent shape, latent scale, and (when config.vae.weights is set) the VAE
    itself (its arguments and a hash of its parameters)."""
    manifest, data = cache.manifest, config.data
    size = data.image_size
    expected = {"image_size": size, "num_classes": data.num_classes,
                "latent_shape": [size // 8, size // 8, 4]}
    found = {k: manifest.get(k) for k in expected}
    if found["latent_shape"] is not None:
        found["latent_shape"] = list(found["latent_shape"])
    if "scaling_factor" in manifest["vae"]:
        expected["latent_scale"] = float(data.latent_scale)
        found["latent_scale"] = manifest["vae"]["scaling_factor"]
    differing = [f"{k}: cache {found[k]}, config {v}" for k, v in expected.items() if found[k] != v]
    if not differing and config.vae.weights:
        vae, params, weights = load_vae(config)
        differing = [f"vae.{k}" for k in _diff_keys(manifest["vae"], vae_identity(vae, params, weights))]
    if differing:
        raise ValueError(f"latent cache {cache.cache_dir} was built for other settings ({'; '.join(differing)}): "
                         "point data.cache_dir at the cache of this config, or re-encode "
                         "(--mode=encode) into a new data.cache_dir")


def load_vae(config):
    """(vae, params, weights path) from config.vae.weights and optional config.vae.arguments."""
    from udit_jax import models
    from udit_jax.convert.vae import load_vae_params

    weights = config.vae.weights
    if not weights:
        raise ValueError("config.vae.weights is empty: set it to the SD VAE weights file (e.g. "
                         "diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-ema)")
    vae = models.build_vae(**dict(config.vae.arguments))
    return vae, load_vae_params(vae, weights), weights


def encode_dataset(config, workdir: str) -> dict[str, Any]:
    """`--mode=encode`: builds the latent cache of config.data's source with config.vae.

    Fields read: data.source, data.dir, data.split, data.tfds_name, data.num_classes (the
    source's class count must be it: checked before encoding), data.image_size,
    data.cache_dir, data.cache_dtype, data.max_bad_fraction, data.min_image_side,
    data.max_image_pixels, data.encode_batch_size (per process), data.records_per_shard,
    data.decode_threads; vae.weights, vae.arguments. Returns the manifest.
    """
    data = config.data
    source = source_from_config(data)
    check_num_classes(source, data.num_classes)
    vae, params, weights = load_vae(config)
    if data.image_size % vae.downsample_factor:
        raise ValueError(f"data.image_size={data.image_size} must be a multiple of the VAE's "
                         f"downsampling factor {vae.downsample_factor}")
    return build_latent_cache(
        source, vae_encode_fn(vae, params), cache_dir_from_config(config, workdir),
        image_size=data.image_size, vae_identity=vae_identity(vae, params, weights),
        dtype=data.cache_dtype, records_per_shard=data.records_per_shard,
        batch_size=data.encode_batch_size, max_bad_fraction=data.max_bad_fraction,
        min_image_side=data.min_image_side, max_image_pixels=data.max_image_pixels,
        decode_threads=data.decode_threads)
