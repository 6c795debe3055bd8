"""udit_jax.paths: the paths a user types, resolved and checked before any job starts."""

import os
import pathlib

import pytest

from udit_jax import config as config_lib
from udit_jax import paths


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("typed", ["runs/demo", "runs/demo/", "./runs//demo/", "runs/x/../demo"])
def test_relative_paths_become_absolute_from_the_current_directory(in_tmp, typed):
    assert paths.resolve(typed) == str(in_tmp / "runs" / "demo")


def test_home_is_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert paths.resolve("~/runs/demo/") == "/home/someone/runs/demo"


@pytest.mark.parametrize("typed,expected", [
    ("gs://bucket/udit_b/", "gs://bucket/udit_b"), ("gs://bucket/udit_b", "gs://bucket/udit_b"),
    ("gs://bucket//", "gs://bucket"), ("s3://b/k/", "s3://b/k")])
def test_urls_keep_their_form(typed, expected):
    assert paths.resolve(typed) == expected
    paths.check_output_dir(expected, "--workdir")   # nothing local to check


def test_symlinks_are_kept_and_followed(in_tmp):
    (in_tmp / "disk" / "run").mkdir(parents=True)
    (in_tmp / "link").symlink_to(in_tmp / "disk")
    assert paths.prepare_workdir("link/run/") == str(in_tmp / "link" / "run")
    (in_tmp / "weights.safetensors").write_text("w")
    (in_tmp / "U-DiT-B-400k.safetensors").symlink_to(in_tmp / "weights.safetensors")
    assert paths.resolve("U-DiT-B-400k.safetensors").endswith("U-DiT-B-400k.safetensors")


def test_new_empty_and_earlier_workdirs_are_accepted_and_nothing_is_written(in_tmp):
    (in_tmp / "empty").mkdir()
    (in_tmp / "earlier" / "checkpoints").mkdir(parents=True)
    (in_tmp / "hidden_only").mkdir()
    (in_tmp / "hidden_only" / ".DS_Store").write_text("")
    for typed in ("new/deeper", "empty", "earlier/", "hidden_only"):
        assert paths.prepare_workdir(typed) == str(in_tmp / typed.rstrip("/"))
    assert not (in_tmp / "new").exists()   # created by the job, not by the check
    assert sorted(os.listdir(in_tmp / "empty")) == []


@pytest.mark.parametrize("make,typed,message", [
    (lambda d: (d / "a_file").write_text("x"), "a_file", r"a_file is a file, not a directory"),
    (lambda d: (d / "a_file").write_text("x"), "a_file/run", r"is under .*a_file, which is a file"),
    (lambda d: ((d / "photos").mkdir(), (d / "photos" / "cat.jpg").write_text("x")), "photos",
     r"photos is a non-empty directory of something else \(cat.jpg\); pass a new or empty"),
])
def test_unusable_workdirs_are_one_clear_line(in_tmp, make, typed, message):
    make(in_tmp)
    with pytest.raises(ValueError, match=message) as e:
        paths.prepare_workdir(typed)
    assert str(e.value).startswith("--workdir: ") and "\n" not in str(e.value)


def test_unwritable_location_is_one_clear_line(in_tmp):
    # /proc refuses new files even to root (a chmod'ed folder would not stop root).
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here: no location that refuses writes")
    with pytest.raises(ValueError, match=r"--workdir: cannot write to /proc/udit_jax_run: .*; "
                                         r"pass a location you can write to"):
        paths.prepare_workdir("/proc/udit_jax_run")


@pytest.mark.parametrize("typed", ["", "  ", None])
def test_empty_workdir_is_refused(typed):
    with pytest.raises(ValueError, match="--workdir is empty"):
        paths.prepare_workdir(typed)


def test_config_paths_resolve_relative_to_the_current_directory(in_tmp):
    config = config_lib.base_config()
    config.lock()   # as main's --config flag: existing fields can change, none can be added
    config.data.dir = "data/fashion/"
    config.vae.weights = "~/sd-vae.safetensors"
    config.eval.reference_npz = "gs://bucket/ref.npz"
    config.eval.sample_npz = "samples.npz"
    workdir = paths.prepare_job(config, "runs/eval")
    assert workdir == str(in_tmp / "runs" / "eval")
    assert config.data.dir == str(in_tmp / "data" / "fashion")
    assert config.vae.weights == str(pathlib.Path("~").expanduser() / "sd-vae.safetensors")
    assert config.eval.reference_npz == "gs://bucket/ref.npz"
    assert config.eval.sample_npz == str(in_tmp / "samples.npz")
    assert config.data.cache_dir == "" and config.sample.out_dir == ""   # defaults stay defaults


def test_every_path_field_exists_in_the_schema():
    config = config_lib.base_config()
    for field in paths.CONFIG_PATH_FIELDS:
        section, name = field.split(".")
        assert isinstance(config[section][name], str), field


def test_export_command_refuses_an_unusable_out_before_reading_weights(in_tmp, capsys):
    from udit_jax import export
    (in_tmp / "notes").mkdir()
    (in_tmp / "notes" / "todo.txt").write_text("x")
    with pytest.raises(SystemExit) as e:   # the weights file does not even exist: never read
        export.main(["--import_weights=missing.pt", "--out=notes/"])
    assert e.value.code == 2
    assert "--out: " + str(in_tmp / "notes") + " is a non-empty directory of something else" in (
        capsys.readouterr().err)


def test_main_refuses_a_file_as_workdir_before_any_job(in_tmp):
    import subprocess
    import sys
    repo = pathlib.Path(__file__).resolve().parents[1]
    (in_tmp / "run.log").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "udit_jax.main", f"--config={repo / 'configs' / 'demo.py'}",
         "--workdir=run.log/"], cwd=in_tmp, text=True, capture_output=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(repo)))
    assert result.returncode != 0
    assert f"--workdir: {in_tmp / 'run.log'} is a file, not a directory" in result.stderr
    assert "JAX process" not in result.stderr   # stopped before the job started
    assert sorted(p.name for p in in_tmp.iterdir()) == ["run.log"]


def test_config_file_under_home_is_found_as_typed(in_tmp):
    """`--config=~/x.py`: the shell leaves the `~` after `=` alone, as for --workdir."""
    import shutil
    import subprocess
    import sys
    repo = pathlib.Path(__file__).resolve().parents[1]
    (in_tmp / "home" / "cfg").mkdir(parents=True)
    shutil.copy(repo / "configs" / "demo.py", in_tmp / "home" / "cfg" / "demo.py")
    result = subprocess.run(
        [sys.executable, "-m", "udit_jax.main", "--config=~/cfg/demo.py", "--workdir=runs/x",
         "--config.total_steps=-1"], cwd=in_tmp, text=True, capture_output=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(repo), HOME=str(in_tmp / "home"), JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    assert "error: total_steps=-1 must be positive" in result.stderr, result.stderr[-2000:]


def test_a_workdir_holds_one_run_at_a_time(in_tmp):
    """Two runs on one workdir saved and deleted the same steps, and the second set aside the
    first one's save in progress: the second is refused, naming the first; the lock goes with
    the run, and a fresh workdir holding only the lock file still counts as empty."""
    workdir = in_tmp / "runs" / "demo"
    workdir.mkdir(parents=True)
    with paths.exclusive_run(workdir):
        with pytest.raises(ValueError, match=rf"--workdir: {workdir} is in use by another run "
                                             rf"\(pid {os.getpid()} on .*\); wait for it"):
            with paths.exclusive_run(workdir):
                pass
        with paths.exclusive_run(workdir, enabled=False):   # other processes of the same run
            pass
    with paths.exclusive_run(workdir):   # released: the next run may start
        pass
    paths.check_output_dir(str(workdir), "--workdir")
    with paths.exclusive_run("gs://bucket/run"):   # no lock on object storage
        pass


def test_a_file_system_without_locks_does_not_stop_a_run(in_tmp, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    entered = []
    with paths.exclusive_run(in_tmp):
        entered.append(True)
    assert entered and "nothing stops a second run" in caplog.text


def test_training_refuses_a_workdir_in_use_before_touching_it(in_tmp):
    import sys
    from udit_jax import train
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import demo
    workdir = in_tmp / "work"
    workdir.mkdir()
    config = demo.get_config()
    config.sample_every_steps = 0
    with paths.exclusive_run(workdir):
        with pytest.raises(ValueError, match="is in use by another run"):
            train.train_and_evaluate(config, str(workdir))
    assert [p.name for p in workdir.iterdir()] == [paths.RUN_LOCK_FILE]
