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
the Adam moments and EMA split over the data-parallel chips (mesh.shard_update: 10 GiB less
per chip on v5p-8 and no slower; on v6e-8 the difference between fitting and not, below).
Before renting, compile the step for the pod on any host: --mode=compile with
--config.compile.topology=v5p-8 (README, "Before you rent a pod"). Measured that way (2-core
x86 host, jax 0.10.2, libtpu 0.0.42.1; XLA's cost model, not a TPU; global batch 256, data
parallel, bf16; the rows below the first two without shard_update):

    chips   remat  grad_accum  HBM per chip       compile  est. ms/step  img/s/chip  est. MFU
    v5p-8   yes    1           37.0 GiB (61%)     373 s    366           175         23.4%
    v5p-8   yes    1           40.2 GiB (58%)     578 s    378           169         22.6% (b)
    v5p-8   yes    1           50.3 GiB (47%)     413 s    381           168         22.4%
    v5p-8   no     1           106.9 GiB: no fit  367 s    -             -           -
    v5p-8   no     2           83.6 GiB (12%)     374 s    467*          137*        18.3%*

(b: the previous release, whose rep FFNs ran their four 1x1 convs one by one; this release
composes each pair where it pays (models/udit.py pointwise_pair). The other rows of this
docstring are that release's too.)

The recipe's global batch 256 on larger slices (fewer images per chip; shard_update; compiled
with one or two other compiles on the host, so the compile times are upper bounds):

    chips    per chip  remat  HBM per chip      compile  est. ms/step  img/s/chip  est. MFU
    v5p-16   32        no     51.9 GiB (45%)    799 s    227           141         18.8%
    v5p-16   32        yes    23.3 GiB (75%)    1208 s   244           131         17.5%
    v5p-32   16        yes    14.3 GiB (85%)    849 s    171           94          12.5%

Per chip the step gets less efficient as its batch shrinks (169 img/s at 64, 141 at 32, 94 at
16), so keep 64 per chip where the recipe allows (v5p-8, or a larger global batch). At 32 per
chip the step fits without remat and is then estimated 8% faster
(--config.model.remat=False); at 64 it does not fit without it.
At 128 per chip (global batch 512 on v5p-8, remat, shard_update; idle host) it is a little
more efficient again: 71.8 GiB per chip (24% headroom), compile 274 s, 667 ms per step, 192
img/s per chip, 25.6% estimated MFU; a larger global batch changes the recipe, so scale its
learning rate yourself.

Pods, 64 images per chip (weak scaling), remat, without shard_update
(--config.mesh.shard_update=False):

    chips     mesh                HBM per chip     compile  est. ms/step  img/s/chip  est. MFU
    v5p-8     data 4              50.3 GiB (47%)   413 s    381           168         22.4%
    v5p-8     fsdp 4              38.8 GiB (59%)   355 s    355*          180*        24.1%*
    v5p-256   data 128            50.3 GiB (47%)   369 s    381           168         22.4%
    v5p-256   data 16 x fsdp 8    35.2 GiB (63%)   381 s    346           185         24.7%

(--config.mesh.rules=fsdp --config.mesh.fsdp=<4 or 8> --config.mesh.data=-1 for the fsdp rows; * from
that compile's program with its 3 unpriced ZeroCrop ops taken out, as --mode=compile now does.)
Per chip, v5p-256 estimates the same step as v5p-8 (100%) with data parallelism; FSDP is estimated
7-9% faster (each chip then updates a fraction of the params and optimizer state). The cost
model's output does not show how it prices the collectives (FSDP on v5p-256: 280 all-gathers,
734 MiB per step), so measure FSDP on the pod before relying on it.

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
convolutions 40% of the step, at 60% of the chip's peak; elementwise work and reductions 41%,
copies and transposes 12%, the scan's dynamic slices 7%. The matmuls alone, at that rate, would
give 60% MFU; 55% needs the other 60% of the time cut to about 3% (a fused attention kernel for
the 24- and 48-wide heads, far fewer passes over the activations): not something XLA's fusion
of this graph does.

remat keeps the projection and attention outputs (model.remat_keeps="outputs", the default):
381 ms against 391 ms keeping only the attention outputs ("attention", 29.9 GiB per chip) and
406 ms keeping only the block inputs ("inputs", 25.2 GiB). (* measured two
releases ago, before the TPU forms of the depthwise conv, attention and RoPE and before the
recomputing attention backward; the remat row was 437 ms then.)
"""

from udit_jax import config as config_lib


def get_config():
    config = config_lib.imagenet_config("U-DiT-L")
    config.model.remat = True
    config.mesh.shard_update = True
    return config
