"""SD VAE encode / decode throughput (images/s) on the current backend, data-parallel over all devices.

    python -m benchmarks.bench_vae                       # batch 32 on accelerators, 2 on CPU
    python -m benchmarks.bench_vae --batch 64 --size 512 --dtypes bfloat16

Random float32 parameters with the SD VAE architecture (throughput does not depend on the
weights). FLOPs come from XLA's cost analysis of the compiled program.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import peak_memory_gib, print_table, time_fn
from udit_jax import models, parallel
from udit_jax.models.vae import decode_latents, make_decode_fn, make_encode_fn


def _flops(fn, *args) -> float | None:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return (analysis or {}).get("flops")


def bench(batch: int, size: int, dtype_name: str, iters: int) -> list[dict]:
    vae = models.build_vae(dtype=jnp.dtype(dtype_name))
    side = vae.downsample_factor
    params = nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, side, side, vae.in_channels)))["params"])
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, size, size, vae.in_channels)).astype(np.float32)
    latents = rng.normal(size=(batch, size // side, size // side, vae.latent_channels)).astype(np.float32)
    images = parallel.shard_batch(mesh, images)
    latents = parallel.shard_batch(mesh, latents)
    encode, decode = make_encode_fn(vae, mesh), make_decode_fn(vae, mesh)
    rows = []
    for op, fn, inputs, flops in (
        ("encode", encode, images,
         _flops(lambda p, x: vae.apply({"params": p}, x, method="encode"), params, images)),
        ("decode", decode, latents, _flops(lambda p, z: decode_latents(vae, p, z), params, latents)),
    ):
        seconds = time_fn(lambda: fn(params, inputs), warmup=2, iters=iters)
        rows.append({"op": op, "dtype": dtype_name, "batch": batch, "size": size,
                     "img/s": batch / seconds, "ms/batch": 1e3 * seconds,
                     "TFLOP/s": None if flops is None else flops / seconds / 1e12,
                     "peak GiB": peak_memory_gib()})
    return rows


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2 if on_cpu else 32, help="global batch (all devices)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    parser.add_argument("--iters", type=int, default=3 if on_cpu else 20)
    args = parser.parse_args()
    rows = []
    for dtype_name in args.dtypes.split(","):
        rows += bench(args.batch, args.size, dtype_name.strip(), args.iters)
    print_table(rows, title="SD VAE (AutoencoderKL, 83.65M params) throughput")


if __name__ == "__main__":
    main()
