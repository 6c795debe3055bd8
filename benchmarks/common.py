"""Timing and table printing shared by the benchmark scripts (never used by tests)."""

from __future__ import annotations

import ast
import importlib.util
import time
from typing import Callable, Sequence

import jax

from udit_jax.parallel import device_kind as device_name, peak_tflops_per_device as peak_tflops  # noqa: F401

# The model table: name -> config file (bench_tpu_compile, bench_gpu).
MODEL_CONFIGS = {"U-DiT-S": "configs/udit_s.py", "U-DiT-B": "configs/udit_b.py",
                 "U-DiT-L": "configs/udit_l.py", "DiT-XL/2": "configs/dit_xl_2.py",
                 "U-DiT-B/512": "configs/udit_b_512.py"}


def time_fn(fn: Callable[[], object], warmup: int = 2, iters: int = 10) -> float:
    """Median wall seconds of fn() (its result blocked on); the first call compiles."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_steps(step: Callable, state, batch, n: int):
    """n calls of state, metrics = step(state, batch), at most two in flight (as the train loop).

    Unbounded asynchronous dispatch of a program with collectives over several XLA CPU devices
    can deadlock XLA's CPU runtime (its all-reduce rendezvous then aborts the process after 40 s;
    seen with 100-150 steps queued on two devices); waiting for step k - 1 while step k runs keeps
    the overlap of dispatch and compute. Returns (state, metrics of the last step), not blocked on.
    """
    metrics = None
    for _ in range(n):
        previous = metrics
        state, metrics = step(state, batch)
        if previous is not None:
            jax.block_until_ready(previous)
    return state, metrics


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def print_table(rows: Sequence[dict], title: str = "") -> None:
    if title:
        print(f"\n{title}  [{device_name()}, {jax.device_count()} device(s)]")
    if not rows:
        return
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def load_config(path: str, overrides: Sequence[str] = ()):
    """A configs/*.py file's get_config(), with "a.b.c=value" overrides (Python literals,
    else strings), as `--config.a.b.c=value` would set them."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        config.update_from_flattened_dict({key: value})
    return config
