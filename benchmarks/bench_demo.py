"""The demo's costs on this machine: init and train-step compile, step time, preview grid.

Runs the demo config's real sharded train step and preview sampler (udit_jax.train) on
synthetic batches of its shapes. Every phase reports wall seconds and process CPU-seconds
(user + sys): on a machine shared with other jobs the wall time is inflated, the CPU time
much less so; the wall time on N free cores is about CPU-seconds / (N x parallel efficiency).

    python -m benchmarks.bench_demo                          # configs/demo.py as it is
    python -m benchmarks.bench_demo --cpu_devices 1          # one XLA device, intra-op threads
    python -m benchmarks.bench_demo --set model.kwargs.hidden_size=48 --steps 20

--cpu_devices splits the host into that many XLA CPU devices (the batch is sharded over
them; default: the config's mesh.cpu_devices); it must be decided before JAX starts, so the
script sets it before touching a device.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax

from benchmarks.common import load_config, print_table, run_steps


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    """Wall and CPU seconds since the last lap."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def bench(config, steps: int) -> list[dict]:
    from udit_jax import models, train
    rows = []

    def row(phase, clock, per=1):
        wall, cpu = clock.lap()
        rows.append({"phase": phase, "wall_s": wall / per, "cpu_s": cpu / per,
                     "cpu/wall": cpu / wall if wall else None})

    clock = Clock()
    trainer = train.make_trainer(config)   # the setup of training itself
    model = trainer.model
    clock.lap()
    state = jax.block_until_ready(trainer.init_state())
    row("init (compile + run)", clock)
    local = next(train.SyntheticBatches(config, 0, 1))
    batch = trainer.global_batch(local)
    step = trainer.jit_step(local)
    clock.lap()
    compiled = step.lower(state, batch).compile()
    row("train step compile", clock)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    clock.lap()
    state, metrics = run_steps(compiled, state, batch, steps)
    jax.block_until_ready(metrics)
    row(f"train step (mean of {steps})", clock, steps)
    step_cpu = rows[-1]["cpu_s"]
    preview = train.make_preview(config, model, trainer.mesh) if config.sample_every_steps else None
    if preview is not None:
        clock.lap()
        preview(state.ema_params)
        row("preview grid (compile + run)", clock)
        preview(state.ema_params)
        row("preview grid", clock)
    gmacs = models.model_info(model)["gmacs"]
    flops = 3 * 2 * gmacs * 1e9 * config.batch_size
    print(f"model: {models.model_info(model)['params'] / 1e6:.2f}M params, {gmacs * 1e3:.1f} MMACs "
          f"per image; batch {config.batch_size}; {jax.device_count()} device(s); "
          f"{flops / step_cpu / 1e9:.2f} GFLOP per CPU-second in the train step")
    print(f"training {config.total_steps} steps: {config.total_steps * step_cpu / 60:.1f} "
          "CPU-minutes (plus compile and previews)")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="XLA CPU devices (-1: one per core; default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. batch_size=64 (repeatable)")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    config.data.source = "synthetic"
    if args.cpu_devices is not None:
        config.mesh.cpu_devices = args.cpu_devices
    from udit_jax import cpu_host, parallel
    parallel.set_cpu_devices(config.mesh.cpu_devices)
    cpu_host.run_single_device_steps_inline()   # as main.py runs the demo
    cpu_host.keep_freed_memory_on_cpu()
    with parallel.without_compilation_cache():   # compiles, not cache reads
        rows = bench(config, args.steps)
    print_table(rows, f"demo costs: {args.config} {' '.join(args.set)}")


if __name__ == "__main__":
    main()
