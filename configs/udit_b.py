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
--config.model.scan_blocks=True: configs/udit_s.py). The train step compiled for pods on any
host (--mode=compile, README "Before you rent a pod"; 2-core x86 host, jax 0.10.2, libtpu
0.0.42.1; XLA's cost model, not a TPU; global batch 256, data parallel, no remat, bf16; this
release, each compiled alone on the host unless marked, *: tests beside it part of the time):

    chips   per chip  blocks    HBM per chip       compile  est. ms/step  img/s/chip  est. MFU
    v5p-8   64        unrolled  20.4 GiB (79%)     474 s*   131.0         489         17.0%
    v5p-8   64        scanned   47.7 GiB (50%)     192 s    150.3         426         14.8%
    v5e-8   32        unrolled  12.7 GiB (21%)     651 s*   167.6         191         15.4%
    v6e-8   32        unrolled  12.5 GiB (61%)     472 s    69.6          460         8.0%

(The previous release, before RoPE rotated bfloat16 queries and keys in bfloat16 and q, k and
v came from three matmuls on v5p and v5e: v5p-8 137.6 ms (scanned 154 ms), v5e-8 177 ms,
v6e-8 73.9 ms.)

The unrolled step is the faster one everywhere, and the only one that fits v5e-8 without
remat. The scanned step (this release, alone on the host) needs remat on v5e-8: 11.5 GiB
(28% headroom), compile 314 s, 274 ms, 117 img/s per chip, 9.4%; on v6e-8 without remat:
26.1 GiB (18% headroom), compile 473 s, 102 ms, 314 img/s per chip, 5.5% (the previous release:
11.4 GiB and 288 ms; 26.1 GiB and 100 ms, which is 2% faster than this release on v6e).

At 128 per chip (global batch 512 on v5p-8, scanned, remat, --config.mesh.shard_update=True;
this release, alone on the host): 27.0 GiB per chip (72% headroom), compile 219 s, 233 ms per
step, 549 img/s per chip, 19.1% estimated MFU (the previous release: 255 ms, 17.5%); a larger
global batch changes the recipe, so scale its learning rate yourself.

Where the v5e-8 estimate goes (--mode=compile's "by kind", this release's unrolled row):
matmuls and convolutions 29% (at 53% of the chip's peak), elementwise work and reductions 66%,
copies 5%: the step is bound by HBM bandwidth. The largest parts are the update's adds
(3.1%), then the first level's blocks and downsampled attentions (a softmax over [256 x 256]
logits per head and group), 1.5% each.
"""

from udit_jax import config as config_lib


def get_config():
    return config_lib.imagenet_config("U-DiT-B")
