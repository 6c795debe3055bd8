"""Checkpoints never lose a run: a restart with a config that does not fit stops and moves
nothing, corrupt files are detected by checksum and set aside (never deleted), all-corrupt
stops, exports replace the old one only after the new one loads, save failures stop the run,
and two processes agree on what to do.

One tiny DiT run (tests/test_train.py's TINY) writes checkpoints at steps 3 and 6; each test
works on a copy. This file run as a script is the worker of the two-process test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import REPO, _env, _free_port, flat_state, make_config  # noqa: E402


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root but the run lock (which names the
    process holding the workdir, so each run writes its own)."""
    from udit_jax.paths import RUN_LOCK_FILE
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != RUN_LOCK_FILE}


def flip_bit(path: pathlib.Path, offset: int | None = None, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from udit_jax import train
    root = tmp_path_factory.mktemp("base")
    state = train.train_and_evaluate(make_config(), str(root / "run"))
    return root / "run", flat_state(state)


@pytest.fixture
def workdir(base_run, tmp_path):
    shutil.copytree(base_run[0], tmp_path / "run")
    return tmp_path / "run"


def _restore(workdir, config=None, **kwargs):
    """Checkpointer.restore of the full train state into SyntheticBatches."""
    from udit_jax import checkpoints, train
    from udit_jax import config as config_lib
    config = config or make_config()
    model = config_lib.build_model(config)
    tx, _ = config_lib.make_optimizer(config.optimizer)
    target = train.abstract_state_on_mesh(config, model, tx, train.parallel.make_mesh())
    iterator = train.SyntheticBatches(config, 0, 1)
    ckpt = checkpoints.Checkpointer(workdir, config=config, **kwargs)
    try:
        restored = ckpt.restore(target, iterator)
    finally:
        ckpt.close()
    return restored, iterator


# ----------------------------------------------------------------------------------------
# Mismatched restarts: one message with the diff; every byte stays where it was.

@pytest.mark.parametrize("overrides, expected", [
    ({"model.kwargs.hidden_size": 16}, r"model\.kwargs\.hidden_size: 32 in the checkpoint, 16 now"),
    ({"optimizer.grad_clip_norm": 1.0},
     r"optimizer\.grad_clip_norm: 0\.0 in the checkpoint, 1\.0 now.*opt_state"),
    ({"seed": 7}, r"seed: 0 in the checkpoint, 7 now"),
    ({"data.num_classes": 4}, r"data\.num_classes: 3 in the checkpoint, 4 now"),
])
def test_mismatched_restart_stops_with_the_diff_and_moves_nothing(workdir, overrides, expected):
    from udit_jax import checkpoints, train
    # A save the previous run left uncommitted stays too (moved only once a restart goes on).
    shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / "9.orbax-checkpoint-tmp")
    before = snapshot(workdir)
    for _ in range(2):   # a second mismatched restart deletes nothing either
        with pytest.raises(checkpoints.IncompatibleCheckpointError, match=expected) as error:
            train.train_and_evaluate(make_config({**overrides, "total_steps": 9}), str(workdir))
        assert "Nothing was moved" in str(error.value) and "on_mismatch" in str(error.value)
        after = snapshot(workdir)
        assert {k: v for k, v in after.items() if k in before} == before
        assert not (workdir / checkpoints.SET_ASIDE_DIR).exists()
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
            "3", "6", "9.orbax-checkpoint-tmp"]


def test_data_state_refused_by_the_iterator_is_incompatible(workdir, monkeypatch):
    """The loader's own refusal (another dataset size or seed) stops the restart, nothing moved."""
    from udit_jax import checkpoints, train

    class SizedBatches(train.SyntheticBatches):
        size = 100

        def get_state(self):
            return dict(super().get_state(), num_examples=self.size)

        def set_state(self, state):
            if state.get("num_examples", 100) != self.size:
                raise ValueError(f"the saved loader state is over {state.get('num_examples', 100)} "
                                 f"examples but this loader has {self.size}")
            super().set_state(state)

    SizedBatches.size = 200
    monkeypatch.setattr(train, "SyntheticBatches", SizedBatches)
    before = snapshot(workdir)
    with pytest.raises(checkpoints.IncompatibleCheckpointError,
                       match=r"data state: the saved loader state is over 100 examples but this "
                             r"loader has 200.*Nothing was moved"):
        train.train_and_evaluate(make_config({"total_steps": 9}), str(workdir))
    assert snapshot(workdir) == before


def test_resumable_fields_may_change_and_config_history_is_kept(workdir, base_run):
    from udit_jax import train
    first = (workdir / "config.json").read_text()
    state = train.train_and_evaluate(make_config({"total_steps": 9, "optimizer.learning_rate": 1e-3,
                                                  "log_every_steps": 1}), str(workdir))
    assert int(state.step) == 9
    assert (workdir / "config.json").read_text() == first     # never overwritten
    history = {p.name: json.loads(p.read_text()) for p in workdir.glob("config-*.json")}
    assert sorted(history) == ["config-0.json", "config-6.json"]
    assert history["config-6.json"]["optimizer"]["learning_rate"] == 1e-3


def test_opt_ins_start_fresh_or_load_params_keep_the_old_checkpoints(workdir, base_run, caplog):
    from udit_jax import checkpoints
    before = snapshot(workdir / "checkpoints")
    wider = make_config({"optimizer.grad_clip_norm": 1.0, "checkpoint.on_mismatch": "load_params"})
    with caplog.at_level(logging.WARNING):
        step, state = _restore_with_init(workdir, wider)
    # The warning says what was moved, without the refusal's "Nothing was moved" and ways out.
    assert "starting at step 0 from the params of step 6" in caplog.text
    assert "Nothing was moved" not in caplog.text and "Ways out" not in caplog.text
    assert step == 0 and int(state.step) == 0
    for key, value in base_run[1].items():
        if key.startswith((".params", ".ema_params")):
            np.testing.assert_array_equal(flat_state(state)[key], value, err_msg=key)
    aside = workdir / checkpoints.SET_ASIDE_DIR
    assert sorted(p.name for p in aside.iterdir()) == ["3.superseded.1", "6.superseded.1"]
    kept = {f"{p.name.split('.')[0]}/{k}": v for p in aside.iterdir()
            for k, v in snapshot(p).items()}
    assert kept == before


def _restore_with_init(workdir, config):
    from udit_jax import checkpoints, train
    from udit_jax import config as config_lib
    model = config_lib.build_model(config)
    tx, _ = config_lib.make_optimizer(config.optimizer)
    mesh = train.parallel.make_mesh()
    _, shardings = train.state_shardings(model, tx, config.seed, mesh, config.mesh.rules)
    ckpt = checkpoints.Checkpointer(workdir, config=config,
                                    on_mismatch=config.checkpoint.on_mismatch)
    try:
        return ckpt.restore(train.abstract_state_on_mesh(config, model, tx, mesh),
                            train.SyntheticBatches(config, 0, 1),
                            init=lambda: train.init_state(model, tx, config.seed, shardings))
    finally:
        ckpt.close()


def _count_tree_reads(monkeypatch) -> dict[str, int]:
    """{step directory: reads of its stored tree metadata} from here on."""
    import orbax.checkpoint as ocp
    reads: dict[str, int] = {}
    original = ocp.StandardCheckpointHandler.metadata

    def counted(self, directory):
        step = pathlib.Path(str(directory)).parent.name
        reads[step] = reads.get(step, 0) + 1
        return original(self, directory)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "metadata", counted)
    return reads


@pytest.mark.parametrize("on_mismatch", ["stop", "load_params"])
def test_a_restart_reads_the_stored_tree_once(workdir, monkeypatch, on_mismatch):
    """Each read is a round trip on gs://: the layout check, the verdict and load_params share
    one (a U-DiT restart offers the other block layout, so all three look at the tree)."""
    from udit_jax import checkpoints
    config = make_config({"checkpoint.on_mismatch": on_mismatch} if on_mismatch == "stop" else
                         {"optimizer.grad_clip_norm": 1.0, "checkpoint.on_mismatch": on_mismatch})
    unused = checkpoints.Relayout(lambda: {"params": {}}, lambda restored, target: restored,
                                  "another layout")
    original = checkpoints.Checkpointer.restore
    monkeypatch.setattr(checkpoints.Checkpointer, "restore",
                        lambda self, *a, **k: original(self, *a, relayouts=[unused], **k))
    reads = _count_tree_reads(monkeypatch)
    step, _ = _restore_with_init(workdir, config)
    assert step == (6 if on_mismatch == "stop" else 0)
    assert reads == {"6": 1}


# ----------------------------------------------------------------------------------------
# Corruption: checksums catch a flipped bit in any file; set aside, never deleted.

FILE_KINDS = {
    "array data": lambda d: sorted((d / "state").rglob("d/*"))[0],
    "array index": lambda d: d / "state" / "manifest.ocdbt",
    "tree metadata": lambda d: d / "state" / "_METADATA",
    "data state": lambda d: d / "data" / "process_0-of-1.json",
    "stored config": lambda d: d / "config" / "metadata",
    "checksum manifest": lambda d: d / "checksums.json",
}


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_a_flipped_bit_in_any_checkpoint_file_falls_back(workdir, kind):
    from udit_jax import checkpoints
    latest = workdir / "checkpoints" / "6"
    pristine = snapshot(latest)
    flip_bit(FILE_KINDS[kind](latest))
    (step, state), iterator = _restore(workdir)
    assert step == 3 and int(state.step) == 3 and iterator.get_state() == {"index": 3}
    aside = workdir / checkpoints.SET_ASIDE_DIR
    assert sorted(p.name for p in aside.iterdir()) == ["6.corrupt.1"]
    assert snapshot(aside / "6.corrupt.1").keys() == pristine.keys()   # every file kept


def test_a_second_corruption_never_overwrites_the_first_set_aside(workdir):
    from udit_jax import checkpoints
    latest = workdir / "checkpoints" / "6"
    copy = workdir.parent / "copy6"
    shutil.copytree(latest, copy)
    aside = workdir / checkpoints.SET_ASIDE_DIR
    for k in (1, 2):
        if not latest.exists():
            shutil.copytree(copy, latest)
        flip_bit(FILE_KINDS["array data"](latest), offset=k)
        assert _restore(workdir)[0][0] == 3
    assert sorted(p.name for p in aside.iterdir()) == ["6.corrupt.1", "6.corrupt.2"]
    assert snapshot(aside / "6.corrupt.1") != snapshot(aside / "6.corrupt.2")


def test_uncommitted_save_is_set_aside_and_the_last_commit_restores(workdir):
    from udit_jax import checkpoints
    shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / "9.orbax-checkpoint-tmp")
    assert _restore(workdir)[0][0] == 6
    assert (workdir / checkpoints.SET_ASIDE_DIR / "9.orbax-checkpoint-tmp.incomplete.1").is_dir()


def test_all_checkpoints_corrupt_stops_and_never_starts_from_scratch(workdir):
    from udit_jax import checkpoints, train
    for step in ("3", "6"):
        flip_bit(FILE_KINDS["array data"](workdir / "checkpoints" / step))
    before = snapshot(workdir)
    for _ in range(2):
        with pytest.raises(checkpoints.NoRestorableCheckpointError,
                           match=r"none of the checkpoints .* can be read \(step 6: .*checksum.*"
                                 r"step 3: .*Nothing was moved.*start_fresh"):
            train.train_and_evaluate(make_config({"total_steps": 9}), str(workdir))
        assert snapshot(workdir) == before
    # The explicit opt-in starts over, keeping both.
    state = train.train_and_evaluate(make_config({"checkpoint.on_mismatch": "start_fresh"}),
                                     str(workdir))
    assert int(state.step) == 6
    aside = workdir / checkpoints.SET_ASIDE_DIR
    assert sorted(p.name for p in aside.iterdir()) == ["3.corrupt.1", "6.corrupt.1"]


def test_checksum_manifest_covers_every_item_file(base_run):
    from etils import epath
    from udit_jax import checkpoints
    step_dir = base_run[0] / "checkpoints" / "6"
    manifest = json.loads((step_dir / checkpoints.MANIFEST_FILE).read_text())["files"]
    items = {k for k in snapshot(step_dir) if "/" in k}
    assert items <= manifest.keys() and any(k.startswith("state/") for k in manifest)
    assert checkpoints.verify_manifest(epath.Path(step_dir)) is None


# ----------------------------------------------------------------------------------------
# Readers and exports.

def test_export_with_a_mismatched_config_fails_and_the_old_export_still_loads(workdir, base_run):
    from udit_jax import checkpoints, export
    out = export.export_from_config(make_config(), str(workdir))
    _, params, _ = export.load_export(out)
    before = snapshot(pathlib.Path(out))
    checkpoints_before = snapshot(workdir / "checkpoints")
    for overrides, expected in [({"model.kwargs.hidden_size": 16}, "hidden_size: 32 in the checkpoint"),
                                ({"diffusion.noise_schedule": "cosine"}, "noise_schedule")]:
        with pytest.raises(checkpoints.IncompatibleCheckpointError, match=expected) as error:
            export.export_from_config(make_config(overrides), str(workdir))
        # A reader's only way out is the checkpoint's config; the training opt-ins do not apply.
        assert "Way out: restore those values" in str(error.value)
        assert "on_mismatch" not in str(error.value) and "--workdir" not in str(error.value)
    assert snapshot(pathlib.Path(out)) == before
    _, again, _ = export.load_export(out)
    for a, b in zip(jax_leaves(params), jax_leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert snapshot(workdir / "checkpoints") == checkpoints_before
    assert not (workdir / checkpoints.SET_ASIDE_DIR).exists()


def test_export_that_fails_to_read_back_keeps_the_old_export(workdir, monkeypatch):
    from udit_jax import export
    out = export.export_from_config(make_config(), str(workdir))
    before = snapshot(pathlib.Path(out))

    def broken_load(path, **kwargs):
        raise ValueError(f"{path} does not read back (injected)")

    monkeypatch.setattr(export, "load_export", broken_load)
    with pytest.raises(ValueError, match="injected"):
        export.export_from_config(make_config(), str(workdir))
    assert snapshot(pathlib.Path(out)) == before


def test_readers_skip_a_corrupt_checkpoint_without_moving_it(workdir):
    from udit_jax import train
    flip_bit(FILE_KINDS["array data"](workdir / "checkpoints" / "6"))
    before = snapshot(workdir)
    _, ema, step = train.restore_ema_params(make_config(), str(workdir))
    assert step == 3
    assert snapshot(workdir) == before


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------------------
# A failed save is never silent.

def test_failing_storage_is_retried_then_stops_the_run_naming_path_and_cause(tmp_path, monkeypatch):
    from udit_jax import checkpoints, train
    calls = []
    real_save = checkpoints.DataIteratorHandler.save

    def flaky(self, directory, args):
        calls.append(directory)
        if len(calls) == 1 or fail_always:
            raise OSError(5, "Input/output error (injected)")
        return real_save(self, directory, args)

    monkeypatch.setattr(checkpoints.DataIteratorHandler, "save", flaky)
    fail_always = False    # one transient failure: retried, the run completes with every save
    state = train.train_and_evaluate(make_config(), str(tmp_path / "transient"))
    assert int(state.step) == 6
    assert sorted(p.name for p in (tmp_path / "transient" / "checkpoints").iterdir()) == ["3", "6"]

    fail_always, calls[:] = True, []
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"could not save the checkpoint at step 3 to .*permanent.*checkpoints/3 "
                             r"\(3 attempts\).*Input/output error \(injected\)"):
        train.train_and_evaluate(make_config(), str(tmp_path / "permanent"))
    assert len(calls) == 3


def test_the_quieting_of_failed_writes_leaves_other_errors_alone(tmp_path, monkeypatch):
    """The filters a writing Checkpointer installs drop only the repeats of a failed save."""
    import types
    from udit_jax import checkpoints
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(checkpoints, "_quieted", set())
    loggers = [logging.getLogger("asyncio"), logging.getLogger("absl")]
    before = [list(logger.filters) for logger in loggers]
    try:
        checkpoints.Checkpointer(tmp_path / "run").close()
        ckpt_dir = str(tmp_path / "run" / "checkpoints")

        def unraisable_from(fn):
            try:
                fn()
            except RuntimeError as e:
                return types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                             exc_traceback=e.__traceback__, err_msg=None, object=None)

        def call_soon_threadsafe():   # asyncio's frame that meets the closed loop
            raise RuntimeError("Event loop is closed")

        def elsewhere():
            raise RuntimeError("Event loop is closed")

        sys.unraisablehook(unraisable_from(call_soon_threadsafe))
        assert seen == []
        other = unraisable_from(elsewhere)
        sys.unraisablehook(other)
        assert seen == [other]

        def passes(logger, record):
            return all(f.filter(record) for f in logger.filters)

        def asyncio_record(error):
            return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1,
                                     "Task exception was never retrieved", (),
                                     (type(error), error, None))

        failed_write = ValueError(f'Error writing "params/0" in {ckpt_dir}/3.orbax-checkpoint-tmp')
        assert not passes(loggers[0], asyncio_record(failed_write))
        assert passes(loggers[0], asyncio_record(ValueError("the user's own task")))
        # orbax's report of the failed write keeps its line and the cause, not the traceback.
        record = logging.LogRecord("absl", logging.ERROR, "/lib/orbax/checkpoint/future.py", 1,
                                   "save thread raised: %s", ("boom",),
                                   (ValueError, failed_write, None))
        assert passes(loggers[1], record) and record.exc_info is None
        assert "save thread raised: boom" in record.getMessage() and ckpt_dir in record.getMessage()
        unrelated = logging.LogRecord("absl", logging.ERROR, "/lib/udit_jax/train.py", 1, "x", (),
                                      (ValueError, ValueError("elsewhere"), None))
        assert passes(loggers[1], unrelated) and unrelated.exc_info is not None
    finally:
        for logger, filters in zip(loggers, before):
            logger.filters[:] = filters


def test_unwritable_checkpoint_directory_stops_the_run_at_that_step(tmp_path, monkeypatch):
    from udit_jax import checkpoints, train
    workdir = tmp_path / "run"

    class BlockCheckpointsAtStep2(train.SyntheticBatches):
        def __next__(self):
            if self.index == 2:   # the checkpoint folder becomes a file: nothing can be written
                shutil.rmtree(workdir / "checkpoints")
                (workdir / "checkpoints").write_text("not a directory")
            return super().__next__()

    monkeypatch.setattr(train, "SyntheticBatches", BlockCheckpointsAtStep2)
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"at step 3 to .*run/checkpoints/3"):
        train.train_and_evaluate(make_config(), str(workdir))


# ----------------------------------------------------------------------------------------
# Two processes where only one cannot read: both fall back together, no hang.

def _worker(job: dict) -> None:
    from udit_jax import parallel
    parallel.initialize_distributed(job["coordinator"], job["num_processes"], job["process_id"])
    import jax
    from udit_jax import checkpoints
    report = {}
    try:
        (step, state), iterator = _restore(job["workdir"])
        report = {"step": step, "index": iterator.get_state()["index"]}
    except checkpoints.IncompatibleCheckpointError as e:
        report = {"error": str(e)}
    pathlib.Path(job["report"] + f".{jax.process_index()}").write_text(json.dumps(report))


def test_two_processes_agree_when_only_one_cannot_read(workdir, tmp_path, tmp_path_factory):
    from udit_jax import checkpoints
    latest = workdir / "checkpoints" / "6"
    # The data state {"index": 6} becomes {"index": 7}: still valid JSON, so only the process
    # whose share of the manifest holds this file (process p verifies files p, p+2, ...) sees
    # the checksum mismatch; the other one alone would resume from it.
    data_file = latest / "data" / "process_0-of-1.json"
    flip_bit(data_file, offset=data_file.read_bytes().index(b"6"), mask=0x01)
    assert json.loads(data_file.read_text()) == {"index": 7}
    coordinator = f"127.0.0.1:{_free_port()}"
    cache = tmp_path_factory.mktemp("cache2")
    procs = [subprocess.Popen(
        [sys.executable, __file__, json.dumps({
            "coordinator": coordinator, "num_processes": 2, "process_id": pid,
            "workdir": str(workdir), "report": str(tmp_path / "report")})],
        cwd=REPO, env=_env(1, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    reports = [json.loads((tmp_path / f"report.{pid}").read_text()) for pid in range(2)]
    assert reports == [{"step": 3, "index": 3}] * 2, reports
    assert sorted(p.name for p in (workdir / checkpoints.SET_ASIDE_DIR).iterdir()) == ["6.corrupt.1"]


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
