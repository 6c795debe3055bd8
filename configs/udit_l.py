"""U-DiT-L on ImageNet 256 (paper Table 2: FID-50K 10.08 at 400K, no CFG).

ImageNet 256x256 as SD-VAE latents (32x32x4), the official U-DiT recipe: AdamW lr 1e-4,
weight decay 0, global batch 256, EMA 0.9999, label dropout 0.1, 400K steps, seed 0.
Compute in bfloat16 with float32 params and optimizer state (--config.model.dtype=float32
for the official float32 arithmetic). First build the latent cache once (ImageNet from tfds,
or --config.data.source=folder --config.data.dir=/path/to/train), then train:

    python -m udit_jax.main --config=configs/udit_l.py --workdir=gs://BUCKET/udit_l --mode=encode \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents \
        --config.vae.weights=/path/to/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
    python -m udit_jax.main --config=configs/udit_l.py --workdir=gs://BUCKET/udit_l \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents

On a TPU pod: launch/tpu_pod.py; on a SLURM GPU cluster: launch/slurm.py.

Defaults for the pods: each stage's blocks as one scan (model.scan_blocks; the unrolled step
takes over half an hour to compile), remat (the only way the recipe's batch fits a v5p-8) and
the Adam moments and EMA split over the data-parallel chips (mesh.shard_update: 8 GiB less
per chip on v5p-8 and no slower; on v6e-8 the difference between fitting and not, below).
Before renting, compile the step for the pod on any host: --mode=compile with
--config.compile.topology=v5p-8 (README, "Before you rent a pod"). Measured that way (2-core
x86 host, jax 0.10.2, libtpu 0.0.42.1; XLA's cost model, not a TPU; global batch 256, data
parallel, bf16; each compiled alone on the host; the rows below the first without
shard_update):

    chips   remat  grad_accum  HBM per chip       compile  est. ms/step  img/s/chip  est. MFU
    v5p-8   yes    1           36.9 GiB (61%)     231 s    366           175         23.3%
    v5p-8   yes    1           44.9 GiB (53%)     255 s    368           174         23.2%
    v5p-8   no     1           103.0 GiB: no fit  258 s    (346)         (185)       (24.7%)
    v5p-8   no     2           69.0 GiB (27%)     269 s    410           156         20.8%

Without remat the step is estimated 6% faster but needs 103 GiB per chip of v5p's 95; with
shard_update it just fits (94.0 GiB, 1% headroom, 346 ms), too close to rely on before the
chip has shown it (--config.model.remat=False on this config). Gradient accumulation in its
place fits but is slower: the scans then store every block's activations, and writing and
reading them is 30% of its estimate. The previous release (four 1x1 convs per rep FFN,
before models/udit.py pointwise_pair) estimated 378 ms (split) and 381 ms (whole) at 40.2 and
50.3 GiB.

The recipe's global batch 256 on larger slices (fewer images per chip; shard_update):

    chips    per chip  remat  HBM per chip      compile  est. ms/step  img/s/chip  est. MFU
    v5p-16   32        no     49.9 GiB (47%)    246 s    214           150         20.0%
    v5p-16   32        yes    20.8 GiB (78%)    307 s    228           140         18.7%
    v5p-32   16        yes    13.0 GiB (86%)    220 s    157           102         13.6%

Per chip the step gets less efficient as its batch shrinks (175 img/s at 64, 150 at 32, 102 at
16), so keep 64 per chip where the recipe allows (v5p-8, or a larger global batch). At 32 per
chip the step fits without remat and is then estimated 6% faster
(--config.model.remat=False); at 64 it fits without it only by 1% (above).
At 128 per chip (global batch 512 on v5p-8, remat, shard_update) it is a little more
efficient again: 65.2 GiB per chip (31% headroom), compile 219 s, 636 ms per step, 201 img/s
per chip, 26.9% estimated MFU; a larger global batch changes the recipe, so scale its
learning rate yourself.

Pods, 64 images per chip (weak scaling), remat, without shard_update
(--config.mesh.shard_update=False):

    chips     mesh                HBM per chip     compile  est. ms/step  img/s/chip  est. MFU
    v5p-8     data 4              44.9 GiB (53%)   255 s    368           174         23.2%
    v5p-8     fsdp 4              33.6 GiB (65%)   282 s    340           188         25.1%
    v5p-256   data 128            44.9 GiB (53%)   277 s    368           174         23.2%
    v5p-256   data 16 x fsdp 8    28.8 GiB (70%)   248 s    333           192         25.7%

(--config.mesh.rules=fsdp --config.mesh.fsdp=<4 or 8> --config.mesh.data=-1 for the fsdp rows.)
Per chip, v5p-256 estimates the same step as v5p-8 (100%) with data parallelism; FSDP is estimated
8-10% faster (each chip then updates a fraction of the params and optimizer state). The cost
model's output does not show how it prices the collectives (FSDP on v5p-256: 264 all-gathers,
727 MiB per step; on v5p-8: 733, 613 MiB), so measure FSDP on the pod before relying on it;
hence the default stays data parallel with shard_update.

v5e and v6e (16 and 32 GiB per chip), remat, scanned, global batch 256 unless stated; this
release, each compiled alone on the host (a short CPU profile ran beside the first at its start):

    chips   per chip  mesh                 HBM per chip       compile  est. ms  img/s/chip  MFU
    v6e-8   32        data 8, split (a)    21.3 GiB (34%)     577 s    283      113         7.6%
    v6e-8   32        data 8               30.3 GiB (5%)      571 s    253      126         8.4%
    v6e-8   32        fsdp 8               17.7 GiB (45%)     508 s    356      90          6.0%
    v5e-8   16        fsdp 8 (global 128)  9.9 GiB (38%)      399 s    560      29          8.9%

(a: mesh.shard_update, the default; False for the others.) On v6e-8 the replicated params, EMA
and Adam moments alone take 13.7 GiB of the 30.3; with shard_update each chip keeps the float32
params whole and an eighth of the EMA and moments (4.7 GiB of arguments): 34% headroom,
estimated 1.26x FSDP's throughput. Without shard_update the step now fits too, estimated 12%
faster, but with 5% headroom, too little to rely on before a run has shown it on the chip (try
--config.mesh.shard_update=False there). v6e's FLOPs outrun its HBM bandwidth on this
memory-bound step (matmuls 27% of the estimated time), hence the low MFU. The v5e-8 row is FSDP
at 16 images per chip (--config.batch_size=128 --config.mesh.rules=fsdp --config.mesh.fsdp=8
--config.mesh.data=-1). The previous release (four 1x1 convs per rep FFN, compiled beside
other compiles): v6e-8 split 23.9 GiB / 302 ms / 7.1%, data 8 33.5 GiB (no fit), fsdp 20.4 GiB /
400 ms / 5.3%; v5e-8 11.1 GiB / 623 ms / 8.0%.

Where the estimate goes (--mode=compile's "by kind", the FSDP v5p-8 program): matmuls and
convolutions 40% of the step, at 63% of the chip's peak; elementwise work and reductions 41%,
copies and transposes 13%, the scan's dynamic slices 6%. The matmuls alone, at that rate, would
give 63% MFU; 55% needs the other 60% of the time cut to about 3% (a fused attention kernel for
the 24- and 48-wide heads, far fewer passes over the activations): not something XLA's fusion
of this graph does.

remat keeps the projection and attention outputs (model.remat_keeps="outputs", the default):
368 ms against 373 ms keeping only the attention outputs ("attention", 28.3 GiB per chip) and
388 ms keeping only the block inputs ("inputs", 24.8 GiB; v5p-8, data 4, without shard_update,
44.9 GiB with "outputs").
"""

from udit_jax import config as config_lib


def get_config():
    config = config_lib.imagenet_config("U-DiT-L")
    config.model.remat = True
    config.mesh.shard_update = True
    return config
