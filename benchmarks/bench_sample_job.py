"""Sampling-job throughput end to end: sampler + VAE decode + PNG / part files + .npz merge.

    python -m benchmarks.bench_sample_job                       # tiny pixel U-DiT; CPU-sized
    python -m benchmarks.bench_sample_job --model U-DiT-B --image_size 256 --num_images 1024 \\
        --per_device_batch 64 --sampler ddpm --steps 250 --cfg_scale 1.5
    python -m benchmarks.bench_sample_job --model DiT-XL/2 --sampler dpm --steps 20 --no_png

A temporary export with random weights (throughput does not depend on them; latent models
get a random SD VAE) is sampled by `sample.run_sampling_job` on all devices. The first
batch (compilation) is run and discarded; the rest of the job is timed, so img/s includes
the host work (quantisation, PNGs, part files) that overlaps the next batch on the device.
TFLOP/s counts 2 x the fused model's MACs per forward (x2 with CFG) x steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
from etils import epath

from benchmarks.common import peak_memory_gib, print_table
from udit_jax import convert, diffusion, export, models, sample, sampler

# The default model: a tiny pixel-space U-DiT that runs anywhere.
TINY_UDIT = dict(hidden_size=32, depth=(1, 1, 2, 1, 1), num_heads=2, mlp_ratio=2, ffn_type="rep",
                 rep=1, attn_type="v2", posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)


def random_tree(abstract, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


def make_export(directory: str, args) -> object:
    import flax.linen as nn
    from udit_jax.convert.vae import vae_params_to_torch
    from udit_jax.models.info import abstract_params
    latent = args.space == "latent"
    model = models.build_model(args.model, input_size=args.image_size // 8 if latent else args.image_size,
                               in_channels=4 if latent else args.channels, num_classes=args.num_classes,
                               dtype=args.dtype, **({} if args.model != "U-DiT" else TINY_UDIT))
    params = random_tree(nn.unbox(abstract_params(model)), 0)
    vae = None
    if latent:
        vae_model = models.build_vae()
        weights = f"{directory}/vae.safetensors"
        convert.save_state_dict(weights, vae_params_to_torch(
            vae_model, random_tree(nn.unbox(abstract_params(vae_model)), 1)))
        vae = {"arguments": {}, "weights": weights}
    export.write_export(f"{directory}/export", model, params,
                        diffusion={"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
                        data={"space": args.space, "image_size": args.image_size,
                              "channels": 3 if latent else args.channels,
                              "num_classes": args.num_classes, "latent_scale": 0.18215},
                        vae=vae, metadata={"source": "benchmark"})
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="U-DiT", help="registry name; 'U-DiT' = a tiny U-DiT")
    p.add_argument("--space", choices=("pixel", "latent"), default=None,
                   help="default: latent for named models, pixel for the tiny one")
    p.add_argument("--image_size", type=int, default=None, help="default 256 (named), 32 (tiny)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--num_images", type=int, default=None, help="default: 4 batches")
    p.add_argument("--per_device_batch", type=int, default=8)
    p.add_argument("--sampler", choices=tuple(sampler.SAMPLERS), default="ddim")
    p.add_argument("--steps", default=None, help="respacing; default per sampler")
    p.add_argument("--cfg_scale", type=float, default=1.5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no_png", action="store_true")
    args = p.parse_args()
    named = args.model != "U-DiT"
    args.space = args.space or ("latent" if named else "pixel")
    args.image_size = args.image_size or (256 if named else 32)
    steps = args.steps or sampler.default_steps(args.sampler)
    batch = args.per_device_batch * jax.device_count()
    num_images = args.num_images or 4 * batch

    with tempfile.TemporaryDirectory() as tmp:
        model = make_export(tmp, args)
        job = dict(num_images=num_images, sampler=args.sampler, steps=steps,
                   cfg_scale=args.cfg_scale, per_device_batch=args.per_device_batch,
                   write_png=not args.no_png)
        t0 = time.perf_counter()
        sample.run_sampling_job(f"{tmp}/export", f"{tmp}/out", **job, max_batches=1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = sample.run_sampling_job(f"{tmp}/export", f"{tmp}/out", **job)
        total = time.perf_counter() - t0
        assert result["finished"]
        t0 = time.perf_counter()
        sample.merge_parts(epath.Path(f"{tmp}/out"), num_images, 0)
        merge = time.perf_counter() - t0

    timed = num_images - batch
    forwards = len(diffusion.space_timesteps(1000, steps))
    gmacs = models.model_info(model)["gmacs_fused"] * (2 if args.cfg_scale > 1 else 1)
    img_s = timed / max(total - merge, 1e-9)
    print_table([{
        "model": args.model, "space": args.space, "size": args.image_size,
        "sampler": f"{args.sampler} {steps}", "cfg": args.cfg_scale, "batch": batch,
        "images": num_images, "first batch s": first, "img/s": img_s,
        "model TFLOP/s": img_s * forwards * 2 * gmacs / 1e3, "merge s": merge,
        "peak GiB": peak_memory_gib(),
    }], title="sampling job (sampler + decode + files)")


if __name__ == "__main__":
    main()
