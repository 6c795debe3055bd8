"""Benchmarks that the README-command tests do not run: they import, and the demo's runs."""

import importlib
import pathlib
import pkgutil
import subprocess
import sys

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
