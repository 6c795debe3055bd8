"""Benchmarks that the README-command tests do not run: they import, and the demo's runs."""

import importlib
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import benchmarks

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_benchmark_imports():
    """Benchmarks of full-size TPU compiles or of the official code are not run by tests; they
    at least import (a helper moved elsewhere once broke two of them)."""
    for module in pkgutil.iter_modules(benchmarks.__path__):
        importlib.import_module(f"benchmarks.{module.name}")


def test_bench_demo_reports_compile_step_and_preview():
    """benchmarks.bench_demo on a one-block demo: init, train-step compile, step time and the
    preview grid, through the trainer's own setup."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_demo", "--steps", "1", "--cpu_devices", "1",
         "--set", "model.kwargs.depth=(0,1,0,0,0)", "--set", "sample.classes=[0]",
         "--set", "sample.per_class=1", "--set", "sample.steps='2'"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in ("init (compile + run)", "train step compile", "train step (mean of 1)",
                  "preview grid"):
        assert phase in proc.stdout, proc.stdout


def test_tpu_compile_cases_set_the_mesh_they_name():
    """bench_tpu_compile's rules: shard_update is data parallel with the update split."""
    from benchmarks.bench_tpu_compile import case_config
    for rules, want in [("data_parallel", ("data_parallel", False, 1)),
                        ("shard_update", ("data_parallel", True, 1)),
                        ("fsdp", ("fsdp", False, 8))]:
        config = case_config("U-DiT-S", "v5e-8", rules, 0, 32, True)
        assert (config.mesh.rules, config.mesh.shard_update, config.mesh.fsdp) == want, rules
        assert config.batch_size == 256 and config.model.scan_blocks


def test_gpu_table_cases_and_roofline():
    """bench_gpu: a bad case is refused before any compute; the roofline takes the model's
    FLOPs at the measured matmul rate or XLA's bytes at the measured copy rate."""
    from benchmarks import bench_gpu
    with pytest.raises(ValueError, match="MODEL:BATCH:REMAT:ATTENTION"):
        bench_gpu.main(["--cases", "U-DiT-L:64:1:flash"])
    with pytest.raises(ValueError, match="MODEL:BATCH:REMAT:ATTENTION"):
        bench_gpu.parse_case("DiT-XL/2:64:0:xla:scanned")   # DiT has no scanned form
    assert bench_gpu.parse_case("DiT-XL/2:64:0:cudnn") == {
        "model": "DiT-XL/2", "per_gpu": 64, "remat": 0, "attention": "cudnn", "scanned": False}
    result = {"model": "DiT-XL/2", "per_gpu": 64, "remat": 0, "attention": "xla", "step_ms": 200.0,
              "global_batch": 64, "img/s": 320.0, "TFLOP/s": 300.0, "MFU": 0.3, "peak_GiB": 50.0,
              "lower_s": 6.0, "compile_s": 35.0, "model_TFLOP/step": 80.0,
              "xla_TFLOP/step": 16.0, "xla_GB/step": 200.0}
    row = bench_gpu.table_row(result, {"matmul_TFLOP/s": 800.0, "copy_TB/s": 4.0})
    # max(80 TFLOP / 800 TFLOP/s = 100 ms, 200 GB / 4 TB/s = 50 ms) over the 200 ms measured.
    assert row["roofline/measured"] == pytest.approx(0.5)
    assert row["XLA/model FLOPs"] == pytest.approx(0.2)
    config = bench_gpu.case_config(bench_gpu.parse_case("U-DiT-L:32:0:cudnn"), devices=2)
    assert (config.batch_size, config.model.remat, config.model.kwargs.attention_impl) == (64, False, "cudnn")
    assert not config.model.scan_blocks   # the configs' default
    assert bench_gpu.case_config(bench_gpu.parse_case("U-DiT-B:64:0:xla:scanned"),
                                 devices=1).model.scan_blocks
    from udit_jax import config as config_lib
    config_lib.check_values(config)   # what validate would refuse on a GPU too


def test_run_steps_keeps_at_most_two_steps_in_flight():
    """Unbounded async dispatch over several XLA CPU devices can deadlock XLA's collectives
    (benchmarks.common.run_steps): each step may start only once the step before last is done."""
    from benchmarks.common import run_steps

    class Pending:   # a step's metrics, "done" only once someone blocks on them
        done = False

        def block_until_ready(self):
            self.done = True
            return self

    issued = []

    def step(state, batch):
        in_flight = sum(not m.done for m in issued)
        assert in_flight <= 1, f"step {len(issued)} dispatched with {in_flight} steps in flight"
        issued.append(Pending())
        return state + 1, issued[-1]

    state, last = run_steps(step, 0, None, 50)
    assert state == 50 and last is issued[-1] and len(issued) == 50
    assert all(m.done for m in issued[:-1]) and not last.done   # the last one is the caller's
