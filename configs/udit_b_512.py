"""U-DiT-B on ImageNet 512 (paper Table 6: FID-50K 15.39 at 400K, no CFG).

ImageNet 512x512 as SD-VAE latents (64x64x4), the official U-DiT recipe: AdamW lr 1e-4,
weight decay 0, global batch 256, EMA 0.9999, label dropout 0.1, 400K steps, seed 0.
Compute in bfloat16 with float32 params and optimizer state (--config.model.dtype=float32
for the official float32 arithmetic). First build the latent cache once (ImageNet from tfds,
or --config.data.source=folder --config.data.dir=/path/to/train), then train:

    python -m udit_jax.main --config=configs/udit_b_512.py --workdir=gs://BUCKET/udit_b_512 --mode=encode \
        --config.data.cache_dir=gs://BUCKET/imagenet512_latents \
        --config.vae.weights=/path/to/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
    python -m udit_jax.main --config=configs/udit_b_512.py --workdir=gs://BUCKET/udit_b_512 \
        --config.data.cache_dir=gs://BUCKET/imagenet512_latents

On a TPU pod: launch/tpu_pod.py; on a SLURM GPU cluster: launch/slurm.py.

The blocks run unrolled and without remat (the ImageNet U-DiT default; why: configs/udit_l.py).
The train step compiled for v5p-8 on a 2-core x86 host (--mode=compile, README "Before you
rent a pod"; jax 0.10.2, libtpu 0.0.42.1; XLA's cost model, not a TPU; global batch 256, 64
per chip, data parallel, bf16; this release, alone on the host): 63.3 GiB per chip of 95
(33% headroom), compile 319 s, 404 ms per step, 158 img/s per chip, 25.7% MFU (the previous
release, before RoPE rotated in bfloat16 and q, k and v came from three matmuls on v5p: 64.3
GiB, 437 ms, 146 img/s, 23.7%; before the queries and keys left their projection
de-interleaved for RoPE, models/udit.py DeinterleavedQKV: 62.8 GiB, 466 ms, 137 img/s, 22.2%).
Matmuls take 55% of the estimated time, at 46% of the chip's peak; the largest parts are the
first level's downsampled attentions (1024 tokens per group), 3.1-3.3% each backward.

Each stage's blocks as one scan (--config.model.scan_blocks=True) needs remat to fit
(--config.model.remat=True; this release, alone on the host): 59.1 GiB per chip (38%
headroom), compile 202 s, 491 ms per step, 130 img/s per chip, 21.1% MFU (the previous
release: 67.1 GiB, 537 ms, 119 img/s, 19.3%; earlier releases, before the de-interleaved q
and k and the attention that keeps its weights in bfloat16: 73.8 GiB, 318 s, 697 ms, 92
img/s, 14.9%).
"""

from udit_jax import config as config_lib


def get_config():
    return config_lib.imagenet_config("U-DiT-B", image_size=512)
