"""U-DiT-B on ImageNet 256 (paper Table 2: FID-50K 16.64 at 400K, no CFG).

ImageNet 256x256 as SD-VAE latents (32x32x4), the official U-DiT recipe: AdamW lr 1e-4,
weight decay 0, global batch 256, EMA 0.9999, label dropout 0.1, 400K steps, seed 0.
Compute in bfloat16 with float32 params and optimizer state (--config.model.dtype=float32
for the official float32 arithmetic). First build the latent cache once (ImageNet from tfds,
or --config.data.source=folder --config.data.dir=/path/to/train), then train:

    python -m udit_jax.main --config=configs/udit_b.py --workdir=gs://BUCKET/udit_b --mode=encode \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents \
        --config.vae.weights=/path/to/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
    python -m udit_jax.main --config=configs/udit_b.py --workdir=gs://BUCKET/udit_b \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents

On a TPU pod: launch/tpu_pod.py; on a SLURM GPU cluster: launch/slurm.py.

The blocks run unrolled (the default; each stage's blocks as one scan with
--config.model.scan_blocks=True: configs/udit_s.py). On v5p-8 the unrolled step needs 20.1 GiB
per chip (79% headroom) instead of the scanned 47.8, and is estimated at 137.6 ms (465 img/s
per chip, 16.2%) instead of 161, but compiles in 377 s instead of 189 s (alone on the host).
The 137.6 ms is this release's, whose queries and keys leave their projection de-interleaved
for RoPE (models/udit.py DeinterleavedQKV); before it the step was 148.5 ms (15.0%), and the
other figures here predate it. On v5e-8 (32 per chip) the unrolled step fits without remat: 12.6 GiB per chip
(22% headroom), 193 ms per step, 166 img/s per chip, 13.4% (compile 578 s, the test suite
running beside it), where the scanned one needs remat (the table's 308 ms, 104 img/s per chip).
On v6e-8 (32 per chip): 12.4 GiB per chip (61% headroom), 80.4 ms, 398 img/s per chip, 6.9%
(compile 727 s, tests beside it), against the table's scanned 26.5 GiB and 108 ms.
--mode=compile's table for pods, measured as udit_s.py's (scanned, global batch 256, data
parallel, bf16):

    chips   per chip  remat  HBM per chip       compile  est. ms/step  img/s/chip  est. MFU
    v5e-8   32        no     16.6 GiB: no fit   -        -             -           -
    v5e-8   32        yes    11.5 GiB (28%)     663 s*   308           104         8.4%
    v5p-8   64        no     47.8 GiB (50%)     189 s    161           397         13.8%
    v6e-8   32        no     26.5 GiB (17%)     1295 s*  108           295         5.1%

(The rep FFN's 1x1 pairs composed. The v5p-8 row is this release's, compiled alone on the
host, with the attention that keeps its weights in bfloat16 (models/layers.py
attention_recomputed; before it: 48.3 GiB, 163 ms, 392 img/s, 13.6%). The v5e-8 and v6e-8
rows predate that change and were compiled with the test suite running beside them (*), so
their compile times are upper bounds. Before the composed pairs: v5e-8 17.2 GiB without
remat, 13.3 GiB, 331 ms, 97 img/s, 7.8% with it; v5p-8 50.6 GiB, 170 ms, 377 img/s, 13.1%;
v6e-8 27.4 GiB, 113 ms, 284 img/s, 4.9%.)

At 128 per chip (global batch 512 on v5p-8, scanned, remat, --config.mesh.shard_update=True; this
release, idle host): 28.3 GiB per chip (70% headroom), compile 199 s, 276 ms per step, 465 img/s
per chip, 16.1% estimated MFU, 17% more images per chip-second than at 64 without remat (before
the bfloat16 attention weights: 30.9 GiB, 283 ms, 452 img/s, 15.7%; before the composed pairs:
34.8 GiB, 295 ms, 434 img/s, 15.1%); a larger global batch changes the recipe, so scale its
learning rate yourself.

Where the v5e-8 estimate goes (--mode=compile's "by kind"): matmuls and convolutions 26% (at
30% of the chip's peak), elementwise work and reductions 57%, the scan's dynamic slices 10%,
copies 8%: the step is bound by HBM bandwidth. The largest model parts are the downsampled
attention (a softmax over [256 x 256] logits per head and group) and the scan's stacking of
residuals (squeeze, dynamic_update_slice; on v5p-8 without remat 34% of the estimate).
"""

from udit_jax import config as config_lib


def get_config():
    return config_lib.imagenet_config("U-DiT-B")
