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

Defaults for the pods: the blocks unrolled, no remat, and the Adam moments and EMA split over
the data-parallel chips (mesh.shard_update: each chip keeps the float32 params whole and a
share of the rest). Before renting, compile the step for the pod on any host: --mode=compile
with --config.compile.topology=v5p-8 (README, "Before you rent a pod"). Measured that way
(2-core x86 host, jax 0.10.2, libtpu 0.0.42.1; XLA's cost model, not a TPU; the recipe's global
batch 256, bf16; each compiled at this release, alone on the host unless marked, *: tests
beside it part of the time, wall time inflated). On v5p and v5e q, k and v come from three
matmuls (models/layers.py qkv_projection), which took the default from 273.9 to 268.1 ms (357
s to compile alone), FSDP from 254.4 to 248.8 ms, remat split from 310.2 to 306.0 ms, remat
FSDP from 290.9 to 287.4 ms, scanned with remat from 330.6 to 320.9 ms, scanned from 328.9 to
311.7 ms, v5p-256 from 255.1 to 248.3 ms and v5e-8 from 547.8 to 533.6 ms; on v6e-8 three
took 171.3 to 173.5 ms (22.5 -> 23.2 GiB), so v6e keeps one matmul split in three:

    chips    /chip  blocks    remat  mesh                     HBM per chip    compile  est. ms  img/s/chip  MFU
    v5p-8    64     unrolled  no     data 4, split (default)  38.8 GiB (59%)  549 s*   268      239         31.9%
    v5p-8    64     unrolled  no     fsdp 4 (b)               35.9 GiB (62%)  736 s*   249      257         34.3%
    v5p-8    64     unrolled  yes    data 4, split            21.4 GiB (77%)  408 s*   306      209         27.9%
    v5p-8    64     unrolled  yes    fsdp 4 (b)               18.2 GiB (81%)  558 s*   287      223         29.7%
    v5p-8    64     scanned   yes    data 4, split            36.2 GiB (62%)  225 s    321      199         26.6%
    v5p-8    64     scanned   no     data 4, split            93.0 GiB (2%)   214 s    312      205         27.4%
    v5p-256  64     unrolled  no     data 128, split (c)      36.4 GiB (62%)  369 s    248      258         34.4%
    v6e-8    32     unrolled  no     data 8, split            22.5 GiB (30%)  520 s    171      187         12.5%
    v5e-8    32     unrolled  yes    data 8, split            13.7 GiB (15%)  512 s*   534      60          18.7%

(b: --config.mesh.rules=fsdp --config.mesh.fsdp=4 --config.mesh.data=-1
--config.mesh.shard_update=False. c: --config.batch_size=8192, weak scaling. Scanned:
--config.model.scan_blocks=True, each stage's blocks as one scan over stacked params.) The
queries and keys leave their projection with RoPE's pairs split in halves (models/udit.py
DeinterleavedQKV), which took 5-10% off every estimate here (the default: 305 -> 286 ms),
and RoPE rotates them in bfloat16 (models/udit.py apply_rope: rotated in float32, XLA kept
float32 copies of them for the backward; the default 286 -> 274 ms, FSDP 267 -> 254 ms);
with FSDP its bias is gathered whole before that reordering, since reordering the split bias
moved its pieces between chips (616 collective-permutes; 267.7 -> 266.8 ms, 31.9 -> 32.0%).
The train step traces only the mesh's platform's forms of the layers (models/layers.py
forms_for): lax.platform_dependent had left the CPU forms' residuals in the TPU program as
zeros, which remat carried through HBM (v5e-8: 576 -> 548 ms; the v5p estimates unchanged),
and every platform's branches to compile (the default 487 -> 357 s, lowering 24 -> 13 s).
FSDP is estimated 7% faster than the default and needs less memory, but the cost model's
output does not show how it prices the collectives (below), so the default stays data
parallel with shard_update until FSDP is measured on a pod. The scanned step compiles in
about 4 minutes instead of 6 (on a many-core host, by the README's estimate from one and two
cores, about 1 instead of 2.5-3.5: far less of its compile is serial) but needs far more
memory (without remat it fits by 2%, too close to rely on) and runs slower: a scan keeps each
block's residuals, as jax's autodiff chose them, in stacked buffers that it zero-fills before
the loop and writes and reads by dynamic slices, while the unrolled program leaves them to
XLA. The same params in either layout: a run may switch on resume (its checkpoints are
converted, checkpoints.Relayout), and --mode=compile with
--config.compile.save_executable=True writes the executable, which training on that topology
then loads instead of compiling. On v5e-8 (16 GiB per chip) the step needs remat: without it the
default cannot fit (on v6e it needs 22.5 GiB per chip), and FSDP over the 8 chips without remat
just fits (this release: 15.8 GiB, 1.0% headroom, 510 ms, 19.5%, compiled in 684 s), too close
to rely on.

The scanned step's other settings, compiled at this release too (alone on the host; the
recipe's global batch 256 unless stated; shard_update unless stated):

    chips    per chip  remat  mesh, notes                    HBM per chip    compile  est. ms  img/s/chip  MFU
    v5p-8    64        no     grad_accum_steps=2 (d)         55.1 GiB (42%)  213 s    383      167         22.3%
    v5p-8    128       yes    global batch 512               56.8 GiB (40%)  213 s    539      237         31.7%
    v5p-16   32        no                                    49.5 GiB (48%)  234 s    203      158         21.1%
    v5p-16   32        yes                                   21.2 GiB (78%)  244 s    212      151         20.1%
    v5p-32   16        yes                                   13.1 GiB (86%)  214 s    147      109         14.5%

(d: --config.optimizer.grad_accum_steps=2 in remat's place: the scans then store every block's
activations, and writing and reading them costs more than remat's recomputation.) Per chip the
scanned step gets less efficient as its batch shrinks (199 img/s at 64, 158 at 32, 109 at 16),
so keep 64 per chip where the recipe allows (v5p-8, or a larger global batch). At 128 per chip
(--config.batch_size=512 on v5p-8) it runs at the unrolled default's rate per chip (237 against
239 img/s) and compiles in under 4 minutes; a larger global batch changes the recipe, so scale
its learning rate yourself.

Pods, 64 images per chip (weak scaling), scanned, remat, without shard_update
(--config.mesh.shard_update=False), compiled at this release alone on the host:

    chips     mesh                HBM per chip     compile  est. ms/step  img/s/chip  est. MFU
    v5p-8     data 4              44.6 GiB (53%)   244 s    323           198         26.5%
    v5p-8     fsdp 4              28.5 GiB (70%)   239 s    290           221         29.5%
    v5p-256   data 128            44.6 GiB (53%)   236 s    323           198         26.5%
    v5p-256   data 16 x fsdp 8    26.2 GiB (72%)   213 s    285           225         30.0%

(--config.mesh.rules=fsdp --config.mesh.fsdp=<4 or 8> --config.mesh.data=-1 for the fsdp rows.)
Per chip, v5p-256 estimates the same step as v5p-8 (100%) with data parallelism; FSDP is
estimated 11-14% faster (each chip then updates a fraction of the params and optimizer state).
The cost model's output does not show how it prices the collectives (FSDP on v5p-256: 304
all-gathers, 727 MiB per step; on v5p-8: 773, 613 MiB), so measure FSDP on the pod before
relying on it; hence the default stays data parallel with shard_update.

v5e and v6e (16 and 32 GiB per chip), remat, scanned, global batch 256 unless stated; compiled
at this release, each alone on the host:

    chips   per chip  mesh                 HBM per chip       compile  est. ms  img/s/chip  MFU
    v6e-8   32        data 8, split (a)    20.3 GiB (37%)     397 s    267      120         8.0%
    v6e-8   32        data 8               30.1 GiB (6%)      482 s    237      135         9.0%
    v6e-8   32        fsdp 8               17.4 GiB (46%)     368 s    327      98          6.5%
    v5e-8   16        fsdp 8 (global 128)  9.8 GiB (39%)      266 s    524      31          9.5%

(a: mesh.shard_update, the default; False for the others.) On v6e-8 the replicated params, EMA
and Adam moments alone take 13.7 GiB of the 30.1; with shard_update each chip keeps the float32
params whole and an eighth of the EMA and moments (4.7 GiB of arguments): 37% headroom,
estimated 1.22x FSDP's throughput. Without shard_update the step fits too, estimated 13%
faster, but with 6% headroom, too little to rely on before a run has shown it on the chip (try
--config.mesh.shard_update=False there). v6e's FLOPs outrun its HBM bandwidth on this
memory-bound step (matmuls 27% of the estimated time), hence the low MFU. The v5e-8 row is FSDP
at 16 images per chip (--config.batch_size=128 --config.mesh.rules=fsdp --config.mesh.fsdp=8
--config.mesh.data=-1).

Where the estimate goes (--mode=compile's "by kind", this release): in the default step
matmuls and convolutions are 38% of the time, at 84% of the chip's peak; elementwise work and
reductions 44%, copies and transposes 17%. The matmuls alone, at that rate, would give 84% MFU;
55% needs the rest cut to under a third of what it is. The fusions that compute the 5x5
depthwise convolutions' taps (the rep FFN's and the downsampler's, forward and input gradient:
25 shifted multiply-adds each on the vector units, with what XLA fused into them) take 27% of
the cycles by themselves. (The shares weigh each op by the TPU
backend's cycle count; the estimate itself is closer to a roofline of each op's bytes and
FLOPs, and this step is bound by its 5.1e11 bytes per chip: rank candidates by bytes.) No part
stands out: the largest single model part is 1.3% of the default step's estimate, the
attention's core (q.k, softmax, weighted sum) writes its [N, M] weights only in bfloat16
(models/layers.py attention_recomputed), and the rest is hundreds of passes over the
activations (norms, RoPE, layouts, the depthwise convolutions) that XLA's fusion of this
graph does not merge.

With remat, it keeps the projection and attention outputs (model.remat_keeps="outputs", the
default); scanned (v5p-8, data 4, without shard_update, this release): 323 ms and 44.6 GiB per
chip, against 327 ms and 26.5 GiB keeping only the attention outputs ("attention") and 334 ms
and 23.3 GiB keeping only the block inputs ("inputs").
"""

from udit_jax import config as config_lib


def get_config():
    config = config_lib.imagenet_config("U-DiT-L")
    config.mesh.shard_update = True
    return config
