"""Saved executables: a training run loads a train step compiled earlier for the same program,
devices and versions instead of compiling, and compiles (saying why) when anything differs or
the file cannot be loaded. CPU executables stand in for TPU ones (the mechanism is the same;
tests/test_compile.py saves a real TPU one)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from test_train import REPO, assert_identical, flat_state, make_config
from udit_jax import executables, train


# The test process's settings (conftest.py: CPU, highest matmul precision): they are part of
# the program, and a program compiled under other settings is rightly not used. No persistent
# compilation cache: an XLA:CPU executable taken from it serializes without its kernels.
ENV = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", JAX_PLATFORMS="cpu",
           JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_ENABLE_COMPILATION_CACHE="false")


def save_step(overrides: dict | None, path) -> pathlib.Path:
    """Compiles the train step of make_config(overrides) on this host's devices and saves it to
    path, in a separate process, as --mode=compile does."""
    job = json.dumps({"overrides": overrides or {}, "path": str(path)})
    proc = subprocess.run([sys.executable, __file__, job], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pathlib.Path(path)


def _save_worker(job: dict) -> None:
    config = make_config(job["overrides"])
    trainer = train.make_trainer(config)
    local = next(train.SyntheticBatches(config, 0, 1))
    lowered = trainer.jit_step(local).lower(trainer.init_state(), trainer.global_batch(local))
    executables.save(job["path"], lowered, lowered.compile(), jax.devices(), config)


def run(config, workdir, caplog) -> tuple[dict, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        state = train.train_and_evaluate(config, str(workdir))
    return flat_state(state), caplog.text


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """Final states of plain runs (compiled as usual) at two learning rates."""
    root = tmp_path_factory.mktemp("plain")
    return {lr: flat_state(train.train_and_evaluate(
        make_config({"optimizer.learning_rate": lr}), str(root / str(lr)))) for lr in (3e-3, 1e-3)}


def test_a_saved_train_step_is_loaded_and_run(tmp_path, caplog, plain_runs):
    config = make_config()
    path = save_step(None, tmp_path / "run" / "compile" / "cpu.executable")
    state, log = run(config, tmp_path / "run", caplog)
    assert f"train step loaded from {path}" in log and "compiling the train step" not in log
    assert_identical(state, plain_runs[3e-3], "loaded executable vs compiled step")

    # The loaded program is the one that runs: an lr-1e-3 executable filed under the lr-3e-3
    # program's fingerprint trains as lr 1e-3 does.
    other = save_step({"optimizer.learning_rate": 1e-3},
                      tmp_path / "swapped" / "compile" / "cpu.executable")
    description = json.loads(path.with_name("cpu.executable.json").read_text())
    other.with_name("cpu.executable.json").write_text(json.dumps(description))
    state, log = run(config, tmp_path / "swapped", caplog)
    assert "train step loaded from" in log
    assert_identical(state, plain_runs[1e-3], "swapped executable")


def test_a_stale_executable_is_not_used_and_the_log_says_why(tmp_path, caplog, plain_runs):
    save_step(None, tmp_path / "compile" / "cpu.executable")
    state, log = run(make_config({"optimizer.learning_rate": 1e-3}), tmp_path, caplog)
    assert "not using the saved executables: cpu.executable: the program differs" in log
    assert "optimizer.learning_rate: 0.003 there, 0.001 now" in log
    assert "compiling the train step" in log
    assert_identical(state, plain_runs[1e-3], "compiled after refusing a stale executable")


# Each case compiles the train step again (20 s on a 2-core CI machine): the truncated
# payload in CI, the other three with -m slow.
@pytest.mark.parametrize("damage", ["payload", pytest.param("description", marks=pytest.mark.slow),
                                    pytest.param("versions", marks=pytest.mark.slow),
                                    pytest.param("flags", marks=pytest.mark.slow)])
def test_a_damaged_or_foreign_executable_means_compiling(tmp_path, caplog, plain_runs, damage):
    path = save_step(None, tmp_path / "compile" / "cpu.executable")
    described = path.with_name("cpu.executable.json")
    if damage == "payload":
        path.write_bytes(path.read_bytes()[:100])
        expected = "could not be loaded"
    elif damage == "description":
        described.write_text("{not json")
        expected = "unreadable description"
    elif damage == "versions":
        d = json.loads(described.read_text())
        d["versions"]["jaxlib"] = "0.0.1"
        described.write_text(json.dumps(d))
        expected = "compiled with jaxlib 0.0.1"
    else:
        d = json.loads(described.read_text())
        d["compiler_flags"] = {"LIBTPU_INIT_ARGS": ["--xla_tpu_some_flag=true"]}
        described.write_text(json.dumps(d))
        expected = "compiled with LIBTPU_INIT_ARGS='--xla_tpu_some_flag=true', this run has (none)"
    state, log = run(make_config(), tmp_path, caplog)
    assert expected in log and "compiling the train step" in log
    assert_identical(state, plain_runs[3e-3], f"compiled after a {damage} problem")


def test_compiler_flags_are_part_of_what_a_saved_executable_must_match(monkeypatch):
    """A program compiled under other libtpu or XLA flags is another program: the flags a run
    sets (say a scoped-VMEM limit for the pod) must not be dropped by loading an executable
    compiled without them. Dumps and the CPU host's device count change no program."""
    for variable in executables.FLAG_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    saved = executables.Description("sha", "TPU v5", 4, executables.versions(),
                                    compiler_flags=executables.compiler_flags())
    assert saved.compiler_flags == {}

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8")
    here = dataclasses.replace(saved, compiler_flags=executables.compiler_flags())
    assert here.differences(saved) == []

    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_scoped_vmem_limit_kib=98304  --xla_b=1")
    here = dataclasses.replace(saved, compiler_flags=executables.compiler_flags())
    assert here.compiler_flags == {"LIBTPU_INIT_ARGS": ["--xla_b=1",
                                                        "--xla_tpu_scoped_vmem_limit_kib=98304"]}
    assert here.differences(saved) == [
        "compiled with LIBTPU_INIT_ARGS=(none), this run has "
        "'--xla_b=1 --xla_tpu_scoped_vmem_limit_kib=98304'"]
    assert saved.differences(here) == [
        "compiled with LIBTPU_INIT_ARGS='--xla_b=1 --xla_tpu_scoped_vmem_limit_kib=98304', "
        "this run has (none)"]
    # The same settings in another order, or one written twice, are the same flags (the
    # compilers take a repeated flag's last value); another value is not.
    for same in ("--xla_tpu_scoped_vmem_limit_kib=98304 --xla_b=1",
                 "--xla_b=0 --xla_tpu_scoped_vmem_limit_kib=98304 --xla_b=1 --xla_b=1"):
        monkeypatch.setenv("LIBTPU_INIT_ARGS", same)
        assert dataclasses.replace(saved, compiler_flags=executables.compiler_flags()
                                   ).differences(here) == []
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_b=1 --xla_tpu_scoped_vmem_limit_kib=98304 --xla_b=0")
    assert dataclasses.replace(saved, compiler_flags=executables.compiler_flags()
                               ).differences(here) == [
        "compiled with LIBTPU_INIT_ARGS='--xla_b=1 --xla_tpu_scoped_vmem_limit_kib=98304', "
        "this run has '--xla_b=0 --xla_tpu_scoped_vmem_limit_kib=98304'"]

    # Descriptions written before the flags were recorded: unknown flags, so compile.
    old = json.loads(json.dumps(dataclasses.asdict(saved)))
    del old["compiler_flags"]
    assert executables.Description(**old).compiler_flags is None
    assert saved.differences(executables.Description(**old)) == [
        "its compiler flags were not recorded (an earlier release saved it)"]


@pytest.mark.parametrize("overrides", [{}, {"mesh.rules": "fsdp", "model.dtype": "bfloat16"}])
def test_compile_mode_lowers_the_program_training_runs(overrides):
    """--mode=compile's train program (abstract state and batch) lowers to the same program as
    a training run's first step on the same devices: a saved executable is found by it."""
    from udit_jax import compile as compile_lib
    config = make_config(overrides)
    trainer = train.make_trainer(config)
    fn, args, *_ = compile_lib._train_program(config, trainer.model, trainer.mesh)
    local = next(train.SyntheticBatches(config, 0, 1))
    training = trainer.jit_step(local).lower(trainer.init_state(), trainer.global_batch(local))
    assert executables.program_sha256(fn.lower(*args)) == executables.program_sha256(training)


if __name__ == "__main__":
    _save_worker(json.loads(sys.argv[1]))
