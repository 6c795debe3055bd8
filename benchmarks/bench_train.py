"""Train-step throughput of a config: img/s, achieved TFLOP/s, MFU and peak memory.

Runs the real sharded train step (train.make_trainer, the setup of training itself) on
synthetic data of the config's shapes, so no dataset is needed. TFLOP/s counts 3x the
forward MACs x 2 FLOPs per image (forward + backward), the papers' MAC convention; MFU
divides by the device's bf16 peak when known. Config overrides are ml_collections' dotted
flags, as for `udit_jax.main`.

    python -m benchmarks.bench_train --config=configs/udit_b.py --per_device_batch=32
    python -m benchmarks.bench_train --config=configs/udit_l.py --per_device_batch=32 \\
        --config.model.remat=True --config.model.dtype=float32
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import peak_memory_gib, print_table, run_steps
from udit_jax import hlo_cost, models, parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", None,
                                         "batch per device (default: the config's global batch)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps before the timed ones")
flags.mark_flags_as_required(["config"])


def bench(config, steps: int, warmup: int) -> dict:
    """One config's train step on this host's devices: compiled ahead of time (lowering and
    compile timed apart), then `steps` timed steps after `warmup` untimed ones, in rounds whose
    median is the step time. XLA's own FLOP and byte counts of the compiled step ride along
    (FLOPs; bytes: XLA's 'bytes accessed', every operand and result of every fused op, an
    upper bound on the memory traffic; None for programs with loops, whose bodies XLA counts
    once)."""
    start = time.perf_counter()
    progress = lambda what: print(f"[{time.perf_counter() - start:7.1f} s] {what}", file=sys.stderr,
                                  flush=True)
    trainer = train.make_trainer(config)
    state = trainer.init_state()
    progress("state initialised")
    local = next(train.SyntheticBatches(config, jax.process_index(), jax.process_count()))
    batch = trainer.global_batch(local)
    t0 = time.perf_counter()
    lowered = trainer.jit_step(local).lower(state, batch)
    lower_s = time.perf_counter() - t0
    progress("train step lowered")
    t0 = time.perf_counter()
    with parallel.without_compilation_cache():   # a compile, not a cache read
        step = lowered.compile()
    compile_s = time.perf_counter() - t0
    progress("train step compiled")
    # XLA counts each loop body once (scanned stages, gradient accumulation): no counts then.
    cost = {} if hlo_cost.has_loops(step.as_text()) else hlo_cost.cost_analysis(step)
    for _ in range(max(warmup, 1)):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    rounds = []
    for n in _rounds(steps):
        t0 = time.perf_counter()
        state, metrics = run_steps(step, state, batch, n)
        jax.block_until_ready(metrics)
        rounds.append((time.perf_counter() - t0) / n)
        progress(f"{n} steps: {1e3 * rounds[-1]:.1f} ms each")
    seconds = float(np.median(rounds))
    images_per_s = config.batch_size / seconds
    gmacs = models.model_info(trainer.model)["gmacs"]
    tflops = images_per_s * 3 * 2 * gmacs * 1e9 / 1e12
    peak = parallel.peak_tflops_per_device()
    return {"model": config.model.name, "dtype": config.model.dtype, "remat": config.model.remat,
            "global_batch": config.batch_size, "step_ms": 1e3 * seconds,
            "step_ms_range": [1e3 * min(rounds), 1e3 * max(rounds)], "img/s": images_per_s,
            "TFLOP/s": tflops, "MFU": None if peak is None else tflops / (peak * jax.device_count()),
            "peak_GiB": peak_memory_gib(), "lower_s": lower_s, "compile_s": compile_s,
            "model_TFLOP/step": 3 * 2 * gmacs * 1e9 * config.batch_size / 1e12,
            "xla_TFLOP/step": cost["flops"] * jax.device_count() / 1e12 if "flops" in cost else None,
            "xla_GB/step": (cost["bytes accessed"] * jax.device_count() / 1e9
                            if "bytes accessed" in cost else None),
            "loss": float(metrics["loss"])}


def _rounds(steps: int) -> list[int]:
    """`steps` split into up to 5 rounds of at least 2 steps."""
    k = max(1, min(5, steps // 2))
    return [steps // k + (i < steps % k) for i in range(k)]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    config.data.source = "synthetic"
    config.sample_every_steps = 0
    config.eval_every_steps = 0
    if _PER_DEVICE_BATCH.value:
        config.batch_size = _PER_DEVICE_BATCH.value * jax.device_count()
    print_table([bench(config, _STEPS.value, _WARMUP.value)],
                f"train step: {config_flags.get_config_filename(flags.FLAGS['config'])}")


if __name__ == "__main__":
    app.run(main)
