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
a run resumes in the other layout) compile in half the time but need more memory and run
slower: on v5p-8 the unrolled step needs 10.2 GiB per chip (89% headroom) instead of 27.0, is
estimated at 84.7 ms (756 img/s per chip, 7.1%) instead of 89.2, and compiles in 313 s instead
of 156 s (this release, alone on the host; configs/udit_l.py says why a scan needs more
memory). On v5e-8 (32 per chip) the unrolled step needs 6.2 GiB per chip (62% headroom),
compiles in 396 s and is estimated at 94.1 ms (340 img/s per chip, 7.4%), against the scanned
row below (14.3 GiB, 156 ms, 205 img/s per chip; compiled before the bfloat16 attention
weights). On v6e-8: 5.8 GiB per chip (82% headroom), compile 547 s, 44.3 ms, 723 img/s per
chip, 3.4%, against the scanned 14.2 GiB and 57.0 ms.

The train step, scanned, compiled for pods on any host (--mode=compile, README "Before you
rent a pod"; 2-core x86 host with other compiles running, jax 0.10.2, libtpu 0.0.42.1; XLA's
cost model, not a TPU; global batch 256, data parallel, bf16):

    chips   per chip  remat  HBM per chip      compile  est. ms/step  img/s/chip  est. MFU
    v5e-8   32        no     14.3 GiB (11%)    505 s*   156           205         4.5%
    v5p-8   64        no     27.0 GiB (72%)    156 s    89.2          718         6.7%
    v6e-8   32        no     14.2 GiB (56%)    1020 s*  57.0          561         2.6%

(With the rep FFN's pairs of 1x1 convs composed (README, Models). The v5p-8 row is this
release's, compiled alone on the host, with the attention that keeps its weights in bfloat16
(models/layers.py attention_recomputed; before it: 27.2 GiB, 92.6 ms, 692 img/s, 6.5%). The
v5e-8 and v6e-8 rows predate that change and were compiled with the test suite running beside
them, so their compile times are upper bounds. Before the composed pairs: v5e-8 15.0 GiB,
167 ms, 192 img/s, 4.2%; v5p-8 28.8 GiB, 95.5 ms, 670 img/s, 6.3%; v6e-8 15.0 GiB, 62.5 ms,
512 img/s, 2.4%.)

The estimate is bound by HBM bandwidth, not the MXU: at 96 channels and 24-wide heads the
downsampled attention streams its [256 x 256] weights per head and group through HBM (now in
bfloat16; the matmuls themselves are small), and without remat the scans' stacking and
reading of every block's residuals is 35% of the v5p-8 estimate (--mode=compile's "by
kind": dynamic slices). v6e, with the most FLOPs per byte of HBM, gains least.
"""

from udit_jax import config as config_lib


def get_config():
    return config_lib.imagenet_config("U-DiT-S")
