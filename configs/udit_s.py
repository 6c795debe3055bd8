"""U-DiT-S on ImageNet 256 (paper Table 2: FID-50K 31.51 at 400K, no CFG).

ImageNet 256x256 as SD-VAE latents (32x32x4), the official U-DiT recipe: AdamW lr 1e-4,
weight decay 0, global batch 256, EMA 0.9999, label dropout 0.1, 400K steps, seed 0.
Compute in bfloat16 with float32 params and optimizer state (--config.model.dtype=float32
for the official float32 arithmetic). First build the latent cache once (ImageNet from tfds,
or --config.data.source=folder --config.data.dir=/path/to/train), then train:

    python -m udit_jax.main --config=configs/udit_s.py --workdir=gs://BUCKET/udit_s --mode=encode \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents \
        --config.vae.weights=/path/to/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
    python -m udit_jax.main --config=configs/udit_s.py --workdir=gs://BUCKET/udit_s \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents

On a TPU pod: launch/tpu_pod.py; on a SLURM GPU cluster: launch/slurm.py.

The blocks run unrolled (the default of every ImageNet U-DiT config). Each stage's blocks as
one scan over stacked params (--config.model.scan_blocks=True; the same params, converted when
a run resumes in the other layout) compile in about half the time but need more memory and run
slower (configs/udit_l.py says why). The train step compiled for pods on any host
(--mode=compile, README "Before you rent a pod"; 2-core x86 host, jax 0.10.2, libtpu 0.0.42.1;
XLA's cost model, not a TPU; global batch 256, data parallel, no remat, bf16; this release,
each compiled alone on the host unless marked, *: tests beside it part of the time):

    chips   per chip  blocks    HBM per chip      compile  est. ms/step  img/s/chip  est. MFU
    v5p-8   64        unrolled  10.3 GiB (89%)    283 s    73.5          870         8.1%
    v5p-8   64        scanned   27.1 GiB (71%)    160 s    82.3          778         7.3%
    v5e-8   32        unrolled  6.2 GiB (61%)     457 s*   79.8          401         8.7%
    v6e-8   32        unrolled  5.8 GiB (82%)     395 s    40.1          798         3.7%

(The previous release, before RoPE rotated bfloat16 queries and keys in bfloat16 and q, k and
v came from three matmuls on v5p and v5e: 74.4 ms unrolled and 83.9 ms scanned on v5p-8,
86.9 ms on v5e-8, 42.1 ms on v6e-8. The queries and keys leave their projection de-interleaved for RoPE,
models/udit.py DeinterleavedQKV: 5-12% off the release before's estimates, 84.7 ms unrolled
and 89.2 ms scanned on v5p-8, 94.1 ms on v5e-8 and 44.3 ms on v6e-8. Compiled before it, and
before the attention that keeps its weights in bfloat16, the scanned step took 14.3 GiB and
156 ms on v5e-8 and 14.2 GiB and 57.0 ms on v6e-8.)

The estimate is bound by HBM bandwidth, not the MXU: at 96 channels and 24-wide heads the
downsampled attention streams its [256 x 256] weights per head and group through HBM (now in
bfloat16; the matmuls themselves are small), and without remat the scans' stacking and
reading of every block's residuals is 35% of the v5p-8 estimate (--mode=compile's "by
kind": dynamic slices). v6e, with the most FLOPs per byte of HBM, gains least.
"""

from udit_jax import config as config_lib


def get_config():
    return config_lib.imagenet_config("U-DiT-S")
