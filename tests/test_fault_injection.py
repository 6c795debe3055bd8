"""Fault injection with real processes (`python -m udit_jax.main`): kill -9 at random points
(saves are asynchronous and every step, so kills land during saves too), SIGTERM with a
failing save, corrupted checkpoint files and mismatched restarts. After each fault the run is
restarted as a user would; the final state must equal an uninterrupted run bit for bit, and
no file the user had may be gone.

CI runs a fast subset; the full matrix is @pytest.mark.slow.
"""

from __future__ import annotations

import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_checkpoints import FILE_KINDS, flip_bit, snapshot  # noqa: E402
from test_train import (REPO, _env, _main_process, _wait_for, _write_config_file,  # noqa: E402
                        make_config)

# Eight steps, a checkpoint after every step (async), so kills hit saves in flight.
RUN = {"total_steps": 8, "checkpoint_every_steps": 1, "log_every_steps": 1, "checkpoint.keep": 20}
SEED = int(os.environ.get("FAULT_SEED", "0"))


def final_arrays(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays and data state of the step-8 checkpoint, read through the restore path."""
    from udit_jax import checkpoints, train
    from udit_jax import config as config_lib
    from test_train import flat_state
    config = make_config(RUN)
    model = config_lib.build_model(config)
    tx, _ = config_lib.make_optimizer(config.optimizer)
    target = train.abstract_state_on_mesh(config, model, tx, train.parallel.make_mesh())
    iterator = train.SyntheticBatches(config, 0, 1)
    ckpt = checkpoints.Checkpointer(workdir, config=config, read_only=True)
    try:
        step, state = ckpt.restore(target, iterator, step=8)
    finally:
        ckpt.close()
    return dict(flat_state(state), data_index=np.asarray(iterator.get_state()["index"]))


def run(config_file, workdir, cache_dir, *flags, timeout=600):
    proc = _main_process(config_file, workdir, cache_dir, *flags)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def user_files(workdir: pathlib.Path) -> set[str]:
    """Names a user has: their own files and every checkpoint step written so far, wherever
    the restore path moved it (set aside keeps the step as the name's first part)."""
    names = {p.name for p in workdir.iterdir() if p.is_file()}
    for folder in ("checkpoints", "checkpoints_set_aside"):
        if (workdir / folder).is_dir():
            names |= {f"step {p.name.split('.')[0]}" for p in (workdir / folder).iterdir()
                      if p.name.split(".")[0].isdigit() and "orbax-checkpoint-tmp" not in p.name}
    return names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cache = root / "cache"
    config_file = _write_config_file(root / "run.py", RUN)
    code, output = run(config_file, root / "reference", cache)
    assert code == 0, output[-4000:]
    return root, config_file, cache, final_arrays(root / "reference")


def _new_workdir(root: pathlib.Path, name: str) -> pathlib.Path:
    workdir = root / name
    workdir.mkdir()
    # A run's workdir (the entry point refuses directories of something else) holding a user's file.
    (workdir / "samples").mkdir()
    (workdir / "notes.txt").write_text("the user's own file")
    return workdir


def kill_at(config_file, workdir, cache, step: int) -> None:
    proc = _main_process(config_file, workdir, cache)
    lines = []
    _wait_for(proc, f"step {step}/", lines)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(setup):
    root, config_file, cache, reference = setup
    workdir = _new_workdir(root, "kill9")
    step = random.Random(SEED).randint(2, 6)
    kill_at(config_file, workdir, cache, step)
    had = user_files(workdir)
    code, output = run(config_file, workdir, cache)
    assert code == 0, output[-4000:]
    assert had <= user_files(workdir), (had, user_files(workdir))
    assert_same(final_arrays(workdir), reference, f"killed at step {step} and resumed")


def test_sigterm_whose_save_fails_says_so_and_exits_non_zero(setup):
    root, config_file, cache, _ = setup
    workdir = _new_workdir(root, "sigterm_fail")
    long_run = _write_config_file(root / "long.py", {**RUN, "total_steps": 100_000,
                                                    "checkpoint_every_steps": 100_000})
    proc = _main_process(long_run, workdir, cache)
    lines = []
    _wait_for(proc, "step 3/", lines)
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "checkpoints").write_text("a file where the checkpoints were")   # unwritable
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-4000:]
    # main prints expected errors as one line (no exception name, no traceback).
    assert "error: " in output and "could not save the checkpoint at step" in output
    assert "checkpoints/" in output and (workdir / "notes.txt").exists()


def test_full_disk_stops_the_run_soon_with_its_error_last_and_no_traceback_flood(setup):
    """A disk that fills up, as a file-size limit (writes fail as on a full disk, EFBIG for
    ENOSPC). The step-100 save fails in the background: the run learns it at a log step and
    stops there, not at its next checkpoint (step 200). orbax's writes used to print ~1,200
    tracebacks, most after the run's error line."""
    import re
    root, _, cache, _ = setup
    workdir = _new_workdir(root, "full_disk")
    config_file = _write_config_file(root / "full_disk.py", {
        **RUN, "total_steps": 300, "checkpoint_every_steps": 100, "log_every_steps": 10})
    # Files over 16 KiB fail to write (SIGXFSZ ignored: a failed write, not a killed process);
    # the checkpoint's data files are larger, the logs and configs smaller.
    small_files_only = ("import os, resource, signal, sys; "
                        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)); "
                        "os.execv(sys.executable, [sys.executable, '-m', 'udit_jax.main', *sys.argv[1:]])")
    proc = subprocess.run([sys.executable, "-c", small_files_only, f"--config={config_file}",
                           f"--workdir={workdir}", "--config.compile.cache=False"], cwd=REPO,
                          env=_env(1, cache), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, output[-4000:]
    stopped = re.match(r"error: could not save the checkpoint at step (\d+) ", lines[-1])
    assert stopped and 100 < int(stopped.group(1)) < 200, output[-4000:]
    assert "the checkpoint save at step 100 to" in output   # the background failure, logged
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-4000:]
    assert "never retrieved" not in output and len(lines) < 80, output[-4000:]
    assert (workdir / "notes.txt").exists()


@pytest.mark.slow
def test_repeated_kills_during_async_saves_then_resume(setup):
    root, config_file, cache, reference = setup
    workdir = _new_workdir(root, "kills")
    rng = random.Random(SEED + 1)
    step = 1
    for _ in range(3):
        step = rng.randint(step + 1, step + 2)
        kill_at(config_file, workdir, cache, step)
    had = user_files(workdir)
    code, output = run(config_file, workdir, cache)
    assert code == 0, output[-4000:]
    assert had <= user_files(workdir)
    assert_same(final_arrays(workdir), reference, "three kills and a resume")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_corrupt_latest_file_then_resume_equals_an_uninterrupted_run(setup, kind):
    root, config_file, cache, reference = setup
    workdir = _new_workdir(root, f"corrupt_{kind.replace(' ', '_')}")
    kill_at(config_file, workdir, cache, 5)
    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    flip_bit(FILE_KINDS[kind](workdir / "checkpoints" / str(latest)))
    had = user_files(workdir)
    code, output = run(config_file, workdir, cache)
    assert code == 0, output[-4000:]
    assert "unreadable" in output and f"moved the checkpoint at step {latest}" in output
    assert had <= user_files(workdir)
    assert_same(final_arrays(workdir), reference, f"{kind} corrupted at step {latest}")


@pytest.mark.slow
def test_mismatched_restart_through_main_then_the_right_restart(setup):
    root, config_file, cache, reference = setup
    workdir = _new_workdir(root, "mismatch")
    kill_at(config_file, workdir, cache, 4)
    before = snapshot(workdir)
    code, output = run(config_file, workdir, cache, "--config.model.kwargs.hidden_size=16")
    assert code != 0 and "model.kwargs.hidden_size: 32 in the checkpoint, 16 now" in output
    assert snapshot(workdir).items() >= before.items()
    code, output = run(config_file, workdir, cache)
    assert code == 0, output[-4000:]
    assert_same(final_arrays(workdir), reference, "mismatched restart, then the right one")
