"""DiT-XL/2 on ImageNet 256 (400K steps: FID-50K 19.5 in the DiT README, no CFG).

ImageNet 256x256 as SD-VAE latents (32x32x4), the official DiT recipe: AdamW lr 1e-4,
weight decay 0, global batch 256, EMA 0.9999, label dropout 0.1, 400K steps, seed 0.
Compute in bfloat16 with float32 params and optimizer state (--config.model.dtype=float32
for the official float32 arithmetic). First build the latent cache once (ImageNet from tfds,
or --config.data.source=folder --config.data.dir=/path/to/train), then train:

    python -m udit_jax.main --config=configs/dit_xl_2.py --workdir=gs://BUCKET/dit_xl_2 --mode=encode \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents \
        --config.vae.weights=/path/to/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
    python -m udit_jax.main --config=configs/dit_xl_2.py --workdir=gs://BUCKET/dit_xl_2 \
        --config.data.cache_dir=gs://BUCKET/imagenet256_latents

On a TPU pod: launch/tpu_pod.py; on a SLURM GPU cluster: launch/slurm.py.

--mode=evaluate reproduces this table's protocol (50K samples, DDPM-250, no guidance); the
paper's FID 2.27 (7M steps) is with --config.eval.cfg_scale=1.5 (three channels guided).

The train step compiled for a pod on any host (--mode=compile, README "Before you rent a
pod"; 2-core x86 host, jax 0.10.2, libtpu 0.0.42.1; XLA's cost model, not a TPU; global
batch 256 on 8 (v5p: 4 chips), 8192 on v5p-256, i.e. 64 per v5p chip, 32 per v5e/v6e chip;
bf16):

    chips     mesh               remat  HBM per chip     compile  est. ms  img/s/chip  est. MFU
    v5p-8     fsdp 4 (b)         no     24.2 GiB (75%)   81 s     163      394         61.0%
    v5p-8     data 4             no     31.8 GiB (67%)   109 s    173      369         57.2%
    v5p-8     data 2 x fsdp 2    no     26.4 GiB (72%)   101 s    170      377         58.5%
    v5p-8     data 4, split (a)  no     24.0 GiB (75%)   110 s    176      363         56.3%
    v5p-256   data 32 x fsdp 4   no     23.8 GiB (75%)   83 s     161      399         61.8%
    v5p-256   data 128           no     31.7 GiB (67%)   99 s     173      369         57.2%
    v6e-8     data 8             no     20.1 GiB (37%)   148 s    96.2     333         25.8%
    v6e-8     fsdp 8             no     12.5 GiB (61%)   127 s    124      259         20.1%
    v5e-8     fsdp 8 (b)         no     13.2 GiB (18%)   127 s    353      91          32.8%
    v5e-8     data 8, split (a)  no     13.4 GiB (16%)   106 s    416      77          27.8%
    v5e-8     fsdp 8             yes    7.9 GiB (51%)    117 s    693      46          16.7%

(a: --config.mesh.shard_update=True. b: --config.mesh.rules=fsdp --config.mesh.fsdp=<4 or 8>
--config.mesh.data=-1; "data 32 x fsdp 4" is the same flags on 128 chips. This release, each
compiled alone on the host (*: another compile or test ran beside it part of the time), with
the attention that keeps its weights in bfloat16 (models/layers.py attention_recomputed);
before it: v5p-8 data 29.9 GiB / 187 ms / 53.1% and split 24.3 GiB / 190 ms / 52.3%, v6e-8
103 ms / 24.1%, v5e-8 split 13.6 GiB / 422 ms / 27.4%, fsdp with remat 12.1 GiB / 666 ms /
17.4%.) The FSDP rows gather the qkv bias whole before the three q/k/v matmuls slice it
(models/layers.py fused_qkv_params); slicing it while split moved its pieces between chips. That
removes 196 collective-permutes and 225 zero-filled buffers from the v5p-8 step and lowers
the summed per-op cycles on every chip (v5p-8 0.2%, v5e-8 1.4%, with remat 3.7%). The
estimate follows on v5p and v6e (v5p-8 fsdp 4: 165.51 -> 165.34 ms, 59.97% -> 60.03%
unrounded; v5p-256 60.6% as before; v6e-8 fsdp 8: 125 -> 124 ms) but not on v5e, where XLA prices the
rescheduled collectives higher (fsdp 8: 344 -> 353 ms, 33.6% -> 32.8%; with remat 681 -> 730
ms); as above, its collective prices are the weak part of the estimate. The train step now
traces only the TPU's forms of the layers (models/layers.py forms_for): with remat the
one-matmul q/k/v of other platforms had left a zero-filled [B, N, 3D] residual per block in
the TPU program (v5e-8 fsdp 8 with remat: 10.2 -> 7.9 GiB, 730 -> 693 ms); without remat XLA
had removed it (v5p-8 fsdp 4 unchanged, compiled in 74 s instead of 82). On v5p the q, k and
v matmuls write their outputs with the tokens minor, the layout attention reads them in
(models/layers.py qkv_projection, a v5p form): XLA had copied each into it, three
[64, 256, 1152] copies per block. That took the v5p rows from 165 / 176 / 176 / 183 / 164 /
176 ms (60.0 / 56.4 / 56.4 / 54.3 / 60.6 / 56.4%) to the table's, with 0-2.5 GiB more per
chip; on v5e the same form was slower (fsdp 8: 353 -> 364 ms; split 416 -> 422 ms, 15.1 GiB),
so v5e and v6e keep the plain three matmuls (their rows are the same programs as before).

The best mesh per chip family, by this estimate: on v5p FSDP over each 4 chips (b; data
parallel across the groups on larger slices); on v5e FSDP over 8 chips without remat; on v6e
data parallel (the default). Each chip then updates a quarter (an eighth) of the float32
params, Adam moments and EMA instead of all of them: in the data-parallel step that update
reads and writes 23 GB per chip per step, about 8 ms on v5p; FSDP adds per-layer all-gathers
of the weights (1.8 GiB per step on v5p-8) and reduces the weight gradients. XLA prices a
collective about as a copy of its bytes through HBM (an all-gather of 512 MiB onto 4 v5p
chips: 0.74 ms, the local copy of the same bytes 0.46 ms), not over the chips' links, so
check FSDP's step time on the pod before relying on it; the default stays data parallel,
which needs no per-family choice. On v5p-8 the matmuls take 89% of the FSDP step's estimate,
at 69% of the chip's peak (86% and 66% data parallel).

On v5e (16 GiB per chip) the float32 params, EMA and Adam moments alone take 10.8 GB, so the
data-parallel step does not fit; FSDP without remat fits with 17% headroom and is the fastest
there. shard_update (a) splits only the moments and EMA (each chip keeps the params whole):
it fits with 16% headroom at 1.2x FSDP's estimate. FSDP with remat needs the least memory,
at twice the time. The estimates count the SPMD partitioner's windowed-einsum loops at their
trip counts. On v5p-8, shard_update saves 5.9 GiB per chip but costs 4% of the step: XLA
copies the float32 params as they come in and again as the all-gather that rebuilds them
goes out (about 11 GB of traffic per chip per step).

Per chip the step gets more efficient as its batch grows (v5p-8, split (a), no remat; *: another
compile beside it; the larger batches change the recipe's global batch, so scale its learning
rate yourself):

    per chip  global  HBM per chip     compile  est. ms  img/s/chip  est. MFU  matmul share
    32        128     14.3 GiB (85%)   140 s*   109      295         45.8%     82%
    64        256     24.0 GiB (75%)   110 s    176      363         56.3%     87%
    128       512     43.1 GiB (55%)   114 s*   309      414         64.2%     88%
    192       768     62.1 GiB (35%)   89 s     449      428         66.3%     88%

(--config.batch_size=<global> --config.mesh.shard_update=True.) The matmuls themselves run at
56% of the chip's peak at 32 per chip and 73% at 128: bigger per-chip batches make longer
matmul rows, which the cost model prices closer to peak. (Before q, k and v were projected
tokens-minor on v5p: 45.1%, 54.3%, 63.1%, 65.1%; before the bfloat16 attention weights:
42.4%, 52.3%, 60.8%, 62.7%.)
On v6e-8 the larger batches do not pay (compiled before the bfloat16 attention weights):
64 per chip (split, no remat) 27.4 GiB (14% headroom), 242 ms, 264 img/s per chip, 20.5%; 128
per chip (split, remat) 27.6 GiB (14%), 432 ms, 297 img/s per chip, 23.0%; keep the 32 per chip
of the table above there.

Measured on one H200 GPU (python -m benchmarks.bench_gpu; jax 0.11.2, cuDNN 9.19): 64 images
per GPU, no remat, XLA's attention: 130.6 ms per step, 490 img/s, 35.3% MFU of the datasheet's
989 TFLOP/s (52% of the 676 TFLOP/s its bf16 matmul measured), 45.9 GiB peak, compile 35 s
(before the bfloat16 attention weights of this release; not yet measured with them).
"""

from udit_jax import config as config_lib


def get_config():
    return config_lib.imagenet_config("DiT-XL/2")
