"""Train-step throughput of a config: img/s, achieved TFLOP/s, MFU and peak memory.

Runs the real sharded train step (udit_jax.train) on synthetic data of the config's shapes,
so no dataset is needed. TFLOP/s counts 3x the forward MACs x 2 FLOPs per image (forward +
backward), the papers' MAC convention; MFU divides by the device's bf16 peak when known.

    python -m benchmarks.bench_train --config=configs/udit_b.py --per_device_batch=32
    python -m benchmarks.bench_train --config=configs/udit_l.py --per_device_batch=32 \\
        --set model.remat=True --set model.dtype=float32
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import time

import jax

from benchmarks.common import peak_memory_gib, print_table
from udit_jax import models, parallel, train
from udit_jax import config as config_lib


def load_config(path: str, overrides: list[str]):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value
    return config


def bench(config, steps: int, warmup: int) -> dict:
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    model = config_lib.build_model(config)
    objective = config_lib.make_objective(config)
    tx, schedule = config_lib.make_optimizer(config.optimizer)
    _, shardings = train.state_shardings(model, tx, config.seed, mesh, config.mesh.rules)
    state = train.init_state(model, tx, config.seed, shardings)
    data = train.SyntheticBatches(config, jax.process_index(), jax.process_count())
    local = next(data)
    batch = {k: parallel.global_batch_from_local(mesh, v) for k, v in local.items()}
    step = train.jit_train_step(train.make_train_step(model, objective, tx, schedule, config, mesh),
                                shardings, mesh, local)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    images_per_s = config.batch_size / seconds
    gmacs = models.model_info(model)["gmacs"]
    tflops = images_per_s * 3 * 2 * gmacs * 1e9 / 1e12
    peak = parallel.peak_tflops_per_device()
    return {"model": config.model.name, "dtype": config.model.dtype, "remat": config.model.remat,
            "global_batch": config.batch_size, "step_ms": 1e3 * seconds, "img/s": images_per_s,
            "TFLOP/s": tflops, "MFU": None if peak is None else tflops / (peak * jax.device_count()),
            "peak_GiB": peak_memory_gib(), "compile_s": compile_s,
            "loss": float(metrics["loss"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--per_device_batch", type=int, default=None,
                        help="batch per device (default: the config's global batch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.dtype=float32 (repeatable)")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    config.data.source = "synthetic"
    if args.per_device_batch:
        config.batch_size = args.per_device_batch * jax.device_count()
    print_table([bench(config, args.steps, args.warmup)], f"train step: {args.config}")


if __name__ == "__main__":
    main()
