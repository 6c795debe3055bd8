"""Ours vs the official PyTorch U-DiT on this machine's CPU: train step and eval forward.

Given a checkout of the official repository (github.com/YuchuanTian/U-DiT) and torch (the
`[torch]` extra; einops too, which the official model imports), times U-DiT-S on 32x32x4
latents at batch 4:

    train step    official: diffusion.training_losses (its own gaussian_diffusion, 1000 steps)
                  -> mean -> backward -> AdamW(lr 1e-4, wd 0) -> EMA update, as its train.py;
                  ours: train.make_trainer's jitted step (the same loss, AdamW and EMA)
    eval forward  official: model.eval() (its re-parameterised FFN) under no_grad;
                  ours: the sampler's inference form (fused FFN), jitted

both in float32, with float32 matmuls (--matmul_precision=float32) or with one bfloat16 pass
per matmul on both sides (--matmul_precision=bfloat16: torch's oneDNN fp32_precision 'bf16'
for matmuls and convolutions, torch.backends.mkldnn.matmul; ours model.matmul_precision=
'bfloat16', which reaches our matmuls and attention but not XLA:CPU's 3x3 convolutions).
Each measurement runs in a fresh process and the two implementations alternate (official,
ours, official, ...) for --rounds rounds, so neither profits from a warm cache or a quiet
moment; the table gives the median of the rounds' mean step times and the
ratio. Our compile time (the first call) is reported separately and not in the step time;
torch has none. Threads: torch's default (one per core); ours one XLA CPU device per
--cpu_devices (0: XLA's single CPU device with its intra-op thread pool).

    python -m benchmarks.bench_official_udit --official=/path/to/U-DiT
    python -m benchmarks.bench_official_udit --official=/path/to/U-DiT --cpu_devices=2 --rounds=5
    python -m benchmarks.bench_official_udit --official=/path/to/U-DiT --matmul_precision=bfloat16
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_OFFICIAL = flags.DEFINE_string("official", None, "checkout of the official U-DiT repository")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating rounds (each a fresh process per side)")
_STEPS = flags.DEFINE_integer("timed_steps", 10, "timed steps per process (after 2 warm-up steps)")
_BATCH = flags.DEFINE_integer("batch", 4, "images per step")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "our XLA CPU devices (config.mesh.cpu_devices)")
_PRECISION = flags.DEFINE_enum("matmul_precision", "float32", ["float32", "bfloat16"],
                               "both sides' matmul precision (see the docstring)")
_SCAN = flags.DEFINE_bool("scan_blocks", False, "our U-DiT with scanned stages (compiles faster)")
_WORKER = flags.DEFINE_string("worker", None, "internal: 'official' or 'ours' (one process)")
flags.mark_flags_as_required(["official"])

WARMUP = 2


def _mean_seconds(fn, steps: int) -> float:
    for _ in range(WARMUP):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def official_worker(repo: str, batch: int, steps: int, precision: str) -> dict:
    """The official model, diffusion and optimiser from the checkout at `repo`."""
    import copy
    import torch
    if precision == "bfloat16":   # float32 tensors, one bfloat16 pass per matmul (oneDNN)
        if not hasattr(torch.backends.mkldnn, "matmul"):
            sys.exit(f"--matmul_precision=bfloat16 needs oneDNN's fp32_precision settings "
                     f"(torch.backends.mkldnn.matmul), which torch {torch.__version__} lacks")
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    sys.path.insert(0, repo)
    from diffusion import create_diffusion   # the official repo's package
    from udit_models import U_DiT_S          # input 32, 4 channels, 1000 classes

    torch.manual_seed(0)
    model = U_DiT_S()
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, 4, 32, 32)
    y = torch.randint(0, 1000, (batch,))

    def train_step():
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9999).add_(p, alpha=1 - 0.9999)

    model.train()
    train_s = _mean_seconds(train_step, steps)
    model.eval()   # the official re-parameterised (fused) FFN
    t = torch.randint(0, 1000, (batch,))

    def eval_forward():
        with torch.no_grad():
            model(x, t, y)

    eval_s = _mean_seconds(eval_forward, steps)
    return {"train_s": train_s, "eval_s": eval_s, "threads": torch.get_num_threads()}


def ours_worker(batch: int, steps: int, cpu_devices: int, scan_blocks: bool, precision: str) -> dict:
    from udit_jax import cpu_host, parallel
    parallel.skip_tpu_backend_without_tpu()
    parallel.set_cpu_devices(cpu_devices)   # before JAX starts its CPU backend
    cpu_host.run_single_device_steps_inline()   # as main.py runs on a CPU
    cpu_host.keep_freed_memory_on_cpu()
    import jax
    import jax.numpy as jnp
    from benchmarks.bench_train import bench
    from udit_jax import config as config_lib
    from udit_jax import sampler

    config = config_lib.imagenet_config("U-DiT-S")
    config.update_from_flattened_dict({
        "batch_size": batch, "data.source": "synthetic", "model.dtype": "float32",
        "sample_every_steps": 0, "eval_every_steps": 0, "mesh.cpu_devices": cpu_devices,
        "model.scan_blocks": scan_blocks,
        "model.matmul_precision": None if precision == "float32" else precision})
    train = bench(config, steps, WARMUP)

    from udit_jax import models
    trained = config_lib.build_model(config)
    model, fuse = sampler.inference_form(trained)
    params = fuse(models.init_params(trained, jax.random.key(0)))
    forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 4))
    t = jnp.arange(batch, dtype=jnp.int32) * 97
    y = jnp.arange(batch, dtype=jnp.int32)
    t0 = time.perf_counter()
    with parallel.without_compilation_cache():   # a compile, not a cache read
        jax.block_until_ready(forward(params, x, t, y))
    eval_compile_s = time.perf_counter() - t0
    eval_s = _mean_seconds(lambda: jax.block_until_ready(forward(params, x, t, y)), steps)
    return {"train_s": train["step_ms"] / 1e3, "eval_s": eval_s,
            "train_compile_s": train["compile_s"], "eval_compile_s": eval_compile_s,
            "devices": jax.device_count()}


def _run_worker(side: str) -> dict:
    argv = [sys.executable, "-m", "benchmarks.bench_official_udit", f"--worker={side}",
            f"--official={_OFFICIAL.value}", f"--batch={_BATCH.value}", f"--timed_steps={_STEPS.value}",
            f"--cpu_devices={_CPU_DEVICES.value}", f"--scan_blocks={_SCAN.value}",
            f"--matmul_precision={_PRECISION.value}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {side} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value == "official":
        print(json.dumps(official_worker(_OFFICIAL.value, _BATCH.value, _STEPS.value,
                                         _PRECISION.value)))
        return
    if _WORKER.value == "ours":
        print(json.dumps(ours_worker(_BATCH.value, _STEPS.value, _CPU_DEVICES.value,
                                     _SCAN.value, _PRECISION.value)))
        return
    if not os.path.isfile(os.path.join(_OFFICIAL.value, "udit_models.py")):
        sys.exit(f"error: --official={_OFFICIAL.value} is not a checkout of the official U-DiT "
                 "repository (no udit_models.py); git clone https://github.com/YuchuanTian/U-DiT")
    runs = {"official": [], "ours": []}
    for r in range(_ROUNDS.value):
        for side in runs:
            runs[side].append(_run_worker(side))
            print(f"round {r + 1}/{_ROUNDS.value} {side}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in runs[side][-1].items()), flush=True)
    med = {side: {k: statistics.median(run[k] for run in rs) for k in rs[0]}
           for side, rs in runs.items()}
    from udit_jax import parallel
    parallel.skip_tpu_backend_without_tpu()   # the table names this host's backend
    from benchmarks.common import print_table
    rows = [{"what": what, "batch": _BATCH.value,
             "official_ms": 1e3 * med["official"][f"{what}_s"],
             "ours_ms": 1e3 * med["ours"][f"{what}_s"],
             "official_img/s": _BATCH.value / med["official"][f"{what}_s"],
             "ours_img/s": _BATCH.value / med["ours"][f"{what}_s"],
             "speed-up": med["official"][f"{what}_s"] / med["ours"][f"{what}_s"],
             "our_compile_s": med["ours"][f"{what}_compile_s"]}
            for what in ("train", "eval")]
    print_table(rows, f"U-DiT-S 32x32x4 float32, {_PRECISION.value} matmuls, official (torch, "
                f"{med['official']['threads']:.0f} threads) vs ours ({med['ours']['devices']:.0f} XLA CPU device(s)), median of "
                f"{_ROUNDS.value} alternating rounds")


if __name__ == "__main__":
    app.run(main)
