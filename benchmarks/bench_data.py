"""Data pipeline throughput: the latent-cache loader and the encode job.

    python -m benchmarks.bench_data                        # both tables
    python -m benchmarks.bench_data --skip-encode --records 20000 --threads 4,16 --workers 0,4

Loader: latents/s delivered to one process from a cache on local disk (ImageNet-256 layout:
float16 [2, 32, 32, 4] mean and std per record, global shuffle, random flips), for several
thread / worker-process counts. The train step it feeds needs global_batch / step_time; the
loader should be at least 20x faster than that.

Encode: images/s of the whole `--mode=encode` job (JPEG decode, ADM crop, VAE on both flips,
ArrayRecord write) on synthetic 500x375 JPEGs, with the SD VAE architecture (random weights)
on accelerators and a small VAE on CPU; the 'decode only' row replaces the VAE by a no-op to
show the host-side ceiling.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks.common import device_name, print_table
from udit_jax.data import latents
from udit_jax.data.loader import Loader
from udit_jax.data.sources import ClassFolderSource


class _ArraySource:
    """Tiny in-memory images: the loader benchmark needs records, not pixels."""

    num_classes, class_names = 1000, [str(i) for i in range(1000)]

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def read(self, index):
        return np.full((8, 8, 3), index % 256, np.uint8), index % 1000

    def key(self, index):
        return str(index)

    def describe(self):
        return {"kind": "bench", "num_items": self.n}


def build_synthetic_cache(directory: pathlib.Path, records: int, latent: int) -> None:
    rng = np.random.default_rng(0)

    def fake_encoder(images):
        shape = (len(images), latent, latent, 4)
        return rng.standard_normal(shape, np.float32), rng.uniform(0.01, 0.1, shape).astype(np.float32)

    latents.build_latent_cache(_ArraySource(records), fake_encoder, directory, image_size=8,
                               vae_identity={"name": "bench"}, batch_size=256, records_per_shard=4096,
                               min_image_side=1, progress=False)


def bench_loader(cache_dir, batch: int, threads: int, workers: int, seconds: float) -> dict:
    loader = Loader(latents.LatentCache(cache_dir), global_batch_size=batch, seed=0,
                    num_threads=threads, num_workers=workers, prefetch_batches=max(4, 2 * threads))
    try:
        for _ in range(3):  # warm-up: threads / workers started, caches touched
            next(loader)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += len(next(loader)["label"])
        rate = count / (time.perf_counter() - start)
    finally:
        loader.close()
    return {"threads": threads, "workers": workers, "batch": batch, "latents/s": rate,
            "read MB/s": rate * loader.table.layout.nbytes / 1e6}


def _jpeg_folder(root: pathlib.Path, count: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), np.uint8)
    for i in range(count):
        folder = root / f"n{i % 10:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(np.roll(base, i, axis=1)).save(buffer, "JPEG", quality=90)
        (folder / f"{i}.JPEG").write_bytes(buffer.getvalue())


def bench_encode(workdir: pathlib.Path, images: int, size: int, vae_kind: str, batch: int,
                 threads: int) -> list[dict]:
    import flax.linen as nn
    import jax

    from udit_jax import models

    root = workdir / "jpegs"
    _jpeg_folder(root, images)
    source = ClassFolderSource(root)
    arguments = {} if vae_kind == "sd" else dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                                 norm_num_groups=8)
    vae = models.build_vae(**arguments)
    side = vae.downsample_factor
    params = nn.unbox(jax.jit(vae.init)(jax.random.key(0), np.zeros((1, side, side, 3), np.float32))["params"])
    encode_fn = latents.vae_encode_fn(vae, params)
    encode_fn(np.zeros((2 * batch, size, size, 3), np.float32))[0].block_until_ready()  # compile
    latent = size // side

    def no_vae(x):
        shape = (len(x), latent, latent, 4)
        return np.zeros(shape, np.float32), np.ones(shape, np.float32)

    rows = []
    for name, fn in (("decode only", no_vae), (f"{vae_kind} VAE", encode_fn)):
        cache = workdir / f"cache-{len(rows)}"
        start = time.perf_counter()
        latents.build_latent_cache(source, fn, cache, image_size=size, vae_identity={"name": name},
                                   batch_size=batch, decode_threads=threads, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"pipeline": name, "images": images, "size": size, "batch": batch,
                     "decode threads": threads, "images/s": images / seconds,
                     "encodes/s": 2 * images / seconds})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=8192, help="records in the synthetic cache")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = ImageNet 256)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (one process)")
    parser.add_argument("--threads", default="1,4,16")
    parser.add_argument("--workers", default="0")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", default="", help="local directory for the caches (default: a temp dir)")
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--encode-images", type=int, default=0, help="default: 512 on accelerators, 32 on CPU")
    parser.add_argument("--encode-size", type=int, default=256)
    parser.add_argument("--encode-batch", type=int, default=0, help="default: 64 on accelerators, 4 on CPU")
    parser.add_argument("--vae", choices=("sd", "small"), default="", help="default: sd on accelerators")
    args = parser.parse_args()

    import jax
    on_cpu = jax.default_backend() == "cpu"
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        tmp = pathlib.Path(tmp)
        build_synthetic_cache(tmp / "cache", args.records, args.latent)
        rows = [bench_loader(tmp / "cache", args.batch, int(t), int(w), args.seconds)
                for w in args.workers.split(",") for t in args.threads.split(",")]
        print_table(rows, f"Loader from a local latent cache ({args.records} records of "
                          f"[2, {args.latent}, {args.latent}, 4] float16, {os.cpu_count()} CPUs)")
        if not args.skip_encode:
            rows = bench_encode(tmp, args.encode_images or (32 if on_cpu else 512), args.encode_size,
                                args.vae or ("small" if on_cpu else "sd"),
                                args.encode_batch or (4 if on_cpu else 64), os.cpu_count() or 1)
            print_table(rows, f"Encode job (--mode=encode) on {device_name()}")


if __name__ == "__main__":
    main()
