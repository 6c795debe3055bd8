"""Training checkpoints: checksummed asynchronous saves whose failures stop the run, and the one
restore path (training, export, every reader) that tells a corrupt checkpoint from one that
this config cannot use.

Layout under `<workdir>/checkpoints/<step>/`:
  state/          the TrainState pytree (orbax; each process writes its own shards)
  data/           one JSON file per process with that process's data-iterator state
  config/         the resolved config the step was written with (JSON)
  checksums.json  size and sha256 of every file above; written by process 0 off the training
                  thread once every process has written its files (async saves: just before
                  the commit rename, so a committed step always has it; sync saves: just after)

Restoring a step, all processes first agree on one verdict (nobody moves or reads before):
  corrupt / incomplete  an uncommitted temp dir, a missing or garbled file, a checksum
      mismatch: warned about and, once an older step restores, moved to
      `<workdir>/checkpoints_set_aside/<name>.<reason>.<k>` (never deleted, never overwritten).
      A workdir none of whose checkpoints restores stops (NoRestorableCheckpointError).
  incompatible  a state tree / shape / dtype this config does not build, a data state the
      iterator refuses, a run-defining config field changed: nothing is moved; stops with
      IncompatibleCheckpointError naming every differing field and the ways out
      (`checkpoint.on_mismatch`: "start_fresh" or "load_params" opt in explicitly).
  another layout  the caller may name other layouts of the same state (`Relayout`: U-DiT's
      scanned or unrolled blocks); a checkpoint holding one restores in it and is converted.
Readers (read_only=True) never move or change anything.

Restores target abstract arrays carrying the *current* shardings, so a checkpoint written on
8 devices restores on 4 (or on a pod).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging as std_logging
import signal
import sys
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

MANIFEST_FILE = "checksums.json"
SET_ASIDE_DIR = "checkpoints_set_aside"
_TMP_MARK = ".orbax-checkpoint-tmp"
# orbax's step bookkeeping, rewritten at and after the commit: not covered by the manifest
# (orbax reads neither for restoring the items).
_STEP_BOOKKEEPING = ("_CHECKPOINT_METADATA", "commit_success.txt")
ON_MISMATCH = ("stop", "start_fresh", "load_params")

# Config fields that may change between restarts of one run (cadences, runtime layout,
# post-training sections, loader performance, the learning-rate knobs the NaN message
# recommends). Every other field defines the run: a change refuses the checkpoint.
RESUMABLE_FIELDS = (
    "total_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
    "eval_every_steps", "batch_size", "checkpoint", "sample", "export", "eval", "mesh",
    "compile",
    # The SD VAE is no part of the train state (the latent cache checks its own encoder).
    "model.dtype", "model.remat", "model.remat_keeps", "vae",
    # Scanned or unrolled blocks: the same params, converted on restore (Relayout).
    "model.scan_blocks",
    "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.grad_clip_norm",
    "optimizer.skip_nonfinite", "optimizer.grad_accum_steps",
    "data.dir", "data.cache_dir", "data.loader_threads", "data.prefetch_batches",
    "data.loader_workers", "data.decode_threads", "data.encode_batch_size",
    "data.records_per_shard", "data.max_bad_fraction",
)


@dataclasses.dataclass(frozen=True)
class Relayout:
    """Another layout of the same state that a checkpoint may hold, and the way from it.

    make_target: () -> that layout's ShapeDtypeStructs, as `restore`'s target (the same
      partial subtrees); called only for a checkpoint that does not hold the target's layout.
    convert: (a state or subtrees of it restored in that layout, the target's
      ShapeDtypeStructs for them) -> the same values in the target's layout, on its shardings.
    name: what the layout is, for the log ("model.scan_blocks=True").
    """
    make_target: Callable[[], Any]
    convert: Callable[[Any, Any], Any]
    name: str


class IncompatibleCheckpointError(ValueError):
    """The checkpoint is readable but does not belong to this config (nothing was moved)."""


class NoRestorableCheckpointError(FileNotFoundError):
    """The workdir has checkpoints and none of them restores (nothing was moved)."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written, retries included: the run must stop."""


# ----------------------------------------------------------------------------------------
# Checksums.

def _files(directory: epath.Path) -> list[str]:
    names = (str((root / name).relative_to(directory)) for root, _, files in directory.walk()
             for name in files)
    return sorted(n for n in names if n not in _STEP_BOOKKEEPING
                  and not n.startswith((MANIFEST_FILE, f".{MANIFEST_FILE}")))


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: epath.Path) -> None:
    """Writes `directory/checksums.json`: {"files": {relative path: {"bytes", "sha256"}}}."""
    files = {name: {"bytes": (directory / name).stat().length, "sha256": _sha256(directory / name)}
             for name in _files(directory)}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    tmp.replace(directory / MANIFEST_FILE)


def verify_manifest(directory: epath.Path, shard: int = 0, num_shards: int = 1) -> str | None:
    """None when this shard of the listed files matches, else what is wrong.

    Raises FileNotFoundError when the step has no manifest (see Checkpointer._verdict).
    """
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for name in sorted(manifest["files"])[shard::num_shards]:
        expected, path = manifest["files"][name], directory / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().length
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} when saved"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


# ----------------------------------------------------------------------------------------
# Config differences.

def flatten_config(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_as_json(config) -> dict:
    """The resolved config as it reads back from JSON (tuples become lists)."""
    text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config)
    return json.loads(text)


def config_differences(stored: Mapping, current: Mapping,
                       resumable: tuple[str, ...] = RESUMABLE_FIELDS) -> list[str]:
    """["model.kwargs.hidden_size: 8 in the checkpoint, 16 now", ...] over run-defining fields."""
    a, b = flatten_config(stored), flatten_config(current)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == r or key.startswith(r + ".") for r in resumable):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_show(a, key)} in the checkpoint, {_show(b, key)} now")
    return out


def _show(flat: dict, key: str) -> str:
    return json.dumps(flat[key]) if key in flat else "absent"


# ----------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process (iterators are per-process objects).

class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (a JSON-able dict, or bytes of JSON) per process."""

    def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
        state = args.iterator.get_state()
        text = state.decode() if isinstance(state, bytes) else json.dumps(state)
        (directory / _data_file_name()).write_text(text)

    def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
        set_data_state(args.iterator, read_data_state(directory))
        return args.iterator


def _data_file_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def read_data_state(directory: epath.Path) -> str:
    """This process's saved iterator state (JSON text), checked to parse."""
    path = directory / _data_file_name()
    if path.exists():
        text = path.read_text()
    else:
        # Written by another number of processes: fine when every process saved the same
        # state (udit_jax.data's loaders and SyntheticBatches count global positions).
        files = sorted(directory.glob("process_*.json"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no data-iterator state")
        texts = {p.read_text() for p in files}
        if len(texts) != 1:
            raise IncompatibleCheckpointError(
                f"{directory} holds per-process data states {[p.name for p in files]} that differ, "
                f"so they cannot be mapped onto {jax.process_count()} processes; resume with the "
                "process count that wrote them")
        text = texts.pop()
    json.loads(text)   # garbled -> ValueError (corrupt)
    return text


def set_data_state(iterator, text: str) -> None:
    # grain's DataLoaderIterator speaks bytes of JSON, dataset iterators speak dicts.
    wants_bytes = isinstance(iterator.get_state(), bytes)
    iterator.set_state(text.encode() if wants_bytes else json.loads(text))


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any


# ----------------------------------------------------------------------------------------
# All processes agree before acting.

_OK, _CORRUPT, _INCOMPATIBLE = 0, 1, 2
_MESSAGE_BYTES = 8192


def _agree(code: int, message: str) -> tuple[int, str]:
    """(the worst code over all processes, the message of the first process reporting it)."""
    if jax.process_count() == 1:
        return code, message
    from jax.experimental import multihost_utils
    data = message.encode()[:_MESSAGE_BYTES]
    row = np.zeros(_MESSAGE_BYTES + 2, np.int32)
    row[0], row[1] = code, len(data)
    row[2:2 + len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))
    worst = int(rows[:, 0].max())
    first = rows[int(np.argmax(rows[:, 0] == worst))]
    text = bytes(first[2:2 + first[1]].astype(np.uint8)).decode(errors="replace")
    if worst != code and worst != _OK:
        text = f"(found by another process) {text}"
    return worst, text


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _restore_args(target) -> Any:
    """Sharded leaves restore onto their sharding; unsharded ones as host numpy arrays."""
    def one(x):
        if getattr(x, "sharding", None) is not None:
            return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    return jax.tree.map(one, target)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in leaves}


def _tree_differences(stored: dict, wanted: dict, partial: bool) -> list[str]:
    out = [f"{k}: not in the checkpoint" for k in sorted(wanted.keys() - stored.keys())]
    if not partial:
        out += [f"{k}: in the checkpoint, not in this config's state"
                for k in sorted(stored.keys() - wanted.keys())]
    for k in sorted(wanted.keys() & stored.keys()):
        if stored[k] != wanted[k]:
            (s_shape, s_dtype), (w_shape, w_dtype) = stored[k], wanted[k]
            out.append(f"{k}: {s_dtype}{list(s_shape)} in the checkpoint, {w_dtype}{list(w_shape)} now")
    return out if len(out) <= 3 else out[:3] + [f"and {len(out) - 3} more leaves"]


# ----------------------------------------------------------------------------------------
# The aftermath of a failed write. orbax runs each save's writes on an event loop of its own
# and closes it at the first error; tensorstore finishes the other writes later and calls back
# into the closed loop (one "Event loop is closed" traceback each, through sys.unraisablehook),
# asyncio reports every failed write task again when it is collected ("... exception was never
# retrieved"), and Python warns at exit of the write coroutines never awaited. A full disk gave
# about 1,200 tracebacks and 8,700 lines, most of them after the run's one error line. They
# repeat a failure the save reports (orbax's error log, the retries' warnings, the error that
# stops the run), so they are dropped, and orbax's own error reports keep their line (with the
# cause) without the traceback.

_quieted: set[str] = set()     # the directories of the Checkpointers that write


def _traceback_codes(tb) -> list:
    codes = []
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return codes


def _from_a_save(error: BaseException | None) -> bool:
    """Raised in orbax's code, or (tensorstore's futures carry no Python frames) about a file
    in a checkpoint directory."""
    if error is None:
        return False
    return (any(directory in str(error) for directory in _quieted)
            or any("orbax" in code.co_filename.replace("\\", "/").split("/")
                   for code in _traceback_codes(error.__traceback__)))


def _closed_loop_callback(unraisable) -> bool:
    """A callback that reached an event loop already closed (asyncio's call_soon_threadsafe)."""
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and any(code.co_name == "call_soon_threadsafe"
                    for code in _traceback_codes(unraisable.exc_traceback)))


class _FailedWriteRepeats(std_logging.Filter):
    """For an error of a save: drops asyncio's "exception was never retrieved" and
    puts orbax's own error report on one line (its message and the cause)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not _from_a_save(error):
            return True
        if "exception was never retrieved" in str(record.msg):
            return False
        if record.name != "asyncio":
            message, cause = record.getMessage(), f"{type(error).__name__}: {str(error)[:500]}"
            record.msg = message if str(error)[:80] in message else f"{message} ({cause})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _quiet_failed_write_aftermath(directory: epath.Path) -> None:
    """Installs the filters once per process; a Checkpointer that writes adds its directory."""
    if not _quieted:
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _closed_loop_callback(unraisable):
                previous(unraisable)

        sys.unraisablehook = hook
        for name in ("asyncio", "absl"):   # orbax logs through absl
            std_logging.getLogger(name).addFilter(_FailedWriteRepeats())
    _quieted.add(str(directory))


def _ignore_unawaited_writes() -> None:
    """After a failed save: orbax's write coroutines left behind are not news at exit."""
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                            category=RuntimeWarning)


# ----------------------------------------------------------------------------------------

class Checkpointer:
    """The checkpoints of one workdir: keeps the last `keep` plus every `keep_every`-th step.

    config: the resolved config (stored with every save, diffed on restore); None skips
      the config comparison (tests, tools without a config).
    read_only: a reader (export, sampling); it never creates, moves or writes anything.
    on_mismatch: "stop", or the explicit opt-ins "start_fresh" / "load_params" (training).
    save_retries / retry_delay_s: a failed save is retried this often (storage hiccups), with
      exponential backoff, before CheckpointSaveError stops the run.
    """

    def __init__(self, workdir, *, keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True, config=None, read_only: bool = False,
                 on_mismatch: str = "stop", save_retries: int = 2, retry_delay_s: float = 2.0):
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"checkpoint.on_mismatch={on_mismatch!r}; use one of {ON_MISMATCH}")
        if not read_only and not (isinstance(keep, int) and keep >= 1):
            # orbax's max_to_keep=0 would delete every checkpoint in the workdir at each save.
            raise ValueError(f"checkpoint.keep={keep!r} must be a positive integer")
        workdir = epath.Path(workdir)
        self.directory = workdir / "checkpoints"
        self.set_aside_dir = workdir / SET_ASIDE_DIR
        self.config = None if config is None else config_as_json(config)
        self.read_only = read_only
        self.on_mismatch = on_mismatch
        self.async_save = async_save and not read_only
        self.save_retries, self.retry_delay_s = save_retries, retry_delay_s
        self._pending: int | None = None            # step of the save not yet confirmed
        self._failed: tuple[int, str] | None = None  # (step, cause) learned between saves
        self._saving: int | None = None             # step the async manifest callback hashes
        self._hashing = concurrent.futures.ThreadPoolExecutor(1, "checkpoint-manifest")
        self._manifest_job: concurrent.futures.Future | None = None
        self._restored: Any = None                  # arrays read, until all processes agree
        self._trees: dict[int, dict] = {}           # stored leaf tables, read once per restore()
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, keep_period=keep_every or None, create=True,
                enable_async_checkpointing=self.async_save,
                # Directories are made in save() itself: a failure there raises at once
                # (made in the background, it leaves the save thread waiting 20 minutes).
                async_options=ocp.AsyncOptions(post_finalization_callback=self._manifest_before_commit,
                                               create_directories_asynchronously=False)
                if self.async_save else None)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"),
                                             options=options)
        if not read_only:
            _quiet_failed_write_aftermath(self.directory)

    # ------------------------------------------------------------------------------------
    # Saving: every save's outcome is learned before the next save and before exit.

    def save(self, step: int, state: Any, iterator: Any, *, wait: bool = False) -> None:
        """Saves asynchronously; wait=True (last and preemption saves) confirms the commit.

        A failed earlier save makes this one synchronous, retried; raises CheckpointSaveError
        naming the path and the cause when the retries fail too.
        """
        wait = wait or not self.async_save   # a sync save is committed: hash it right away
        failure, self._failed = self._failed, None
        failure = failure or self._settle()
        if failure is not None:
            logging.error("the checkpoint save at step %d to %s failed (%s); saving step %d now and "
                          "waiting for it", failure[0], self.directory, failure[1], step)
            wait = True
        causes = [] if failure is None else [f"step {failure[0]}: {failure[1]}"]
        for attempt in range(self.save_retries + 1):
            cause = self._issue(step, state, iterator)
            if cause is None and wait:
                settled = self._settle()
                cause = settled and settled[1]
            if cause is None:
                return
            causes.append(f"step {step}: {cause}")
            if attempt < self.save_retries:
                delay = self.retry_delay_s * 2 ** attempt
                logging.warning("saving the checkpoint at step %d to %s failed (%s); retrying in "
                                "%.0f s", step, self.directory, cause, delay)
                time.sleep(delay)
        raise CheckpointSaveError(
            f"could not save the checkpoint at step {step} to {self.directory / str(step)} "
            f"({len(causes)} attempts): {causes[-1]}. Training stopped so that no steps are "
            f"trained without a checkpoint; "
            + (f"the newest saved checkpoint is step {latest}" if (latest := self.latest_step())
               is not None else "no checkpoint of this run is saved yet")
            + ". Fix the storage (space, permissions, path) and restart.")

    def learn_finished_save(self, step: int, state: Any, iterator: Any) -> None:
        """Between saves (the train loop calls it at its log steps): once the pending asynchronous
        save has finished on every process, learns how it ended. A failed one is handled now, as
        the next save() would handle it: this step is saved synchronously (with retries), or
        CheckpointSaveError stops the run. Without it a run would train on until its next
        checkpoint (5,000 steps by default) with nothing saved since the failure."""
        if self._pending is None or not self.async_save:
            return
        busy = self.manager.is_saving_in_progress()
        if _agree(_CORRUPT if busy else _OK, "")[0] != _OK:   # not finished on every process
            return
        self._failed = self._settle()
        if self._failed is not None:
            self.save(step, state, iterator, wait=True)

    def _issue(self, step: int, state: Any, iterator: Any) -> str | None:
        items = {"state": ocp.args.StandardSave(state), "data": DataIteratorSave(iterator)}
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        self._saving = self._pending = step
        cause = None
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - whatever the storage layer raises is a failed save
            cause = f"{type(e).__name__}: {e}"
            _ignore_unawaited_writes()
        code, cause = _agree(_CORRUPT if cause else _OK, cause or "")
        if code == _OK:
            return None
        self._pending = None
        return cause

    def _settle(self) -> tuple[int, str] | None:
        """Waits for the pending save; (step, cause) when it did not commit, else None."""
        step, self._pending = self._pending, None
        if step is None:
            return None
        cause = None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - whatever the storage layer raised in the background
            cause = f"{type(e).__name__}: {e}"
            _ignore_unawaited_writes()
        if cause is None and not (self.directory / str(step)).exists():
            cause = "the step directory was never committed (orbax's error is in the log above)"
        code, cause = _agree(_CORRUPT if cause else _OK, cause or "")
        if code != _OK:
            return step, cause
        if not self.async_save and jax.process_index() == 0:
            self._wait_for_manifest()
            self._manifest_job = self._hashing.submit(write_manifest, self.directory / str(step))
        return None

    def _manifest_before_commit(self) -> None:
        # orbax's background thread on process 0, after every process wrote its files and
        # before the rename that commits the step (object stores: no rename, final path).
        tmp = self.directory / f"{self._saving}{_TMP_MARK}"
        write_manifest(tmp if tmp.exists() else self.directory / str(self._saving))

    def _wait_for_manifest(self) -> None:
        if self._manifest_job is not None:
            try:
                self._manifest_job.result()
            except OSError as e:
                logging.warning("could not write the checksum manifest of a checkpoint (%s); it "
                                "restores unverified", e)
            self._manifest_job = None

    # ------------------------------------------------------------------------------------
    # Restoring.

    def restore(self, target: Any, iterator: Any = None, *, init: Callable[[], Any] | None = None,
                step: int | None = None, partial: bool = False,
                relayouts: Sequence[Relayout] = ()) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores; see the module docstring.

        target: the state's jax.ShapeDtypeStructs (with shardings: restored onto them; without:
          host numpy). partial=True restores only target's leaves (e.g. {"ema_params", "step"}).
        iterator: its state is set in place (None: the data state is not read).
        init: builds the step-0 state; given (training), a workdir without checkpoints returns
          (0, init()) and the on_mismatch opt-ins can start fresh. Without it, None.
        step: restore exactly this step (readers); None = the newest that restores.
        relayouts: other layouts a checkpoint may hold; one whose tree matches restores in it
          and is converted to target's.
        """
        self._trees = {}   # a step directory can be replaced between calls (start_fresh)
        try:
            return self._restore(target, iterator, init, step, partial, relayouts)
        finally:
            self._trees = {}

    def _restore(self, target, iterator, init, step, partial, relayouts):
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}; "
                                        f"available steps: {sorted(steps)}")
            steps = [step]
        initial_data = None if iterator is None else iterator.get_state()
        corrupt: list[tuple[int, str]] = []
        for candidate in steps:
            read_as, relayout = self._layout(candidate, target, partial, relayouts)
            code, message = _agree(*self._verdict(candidate, read_as, iterator, partial))
            if code == _OK:
                code, message = _agree(*self._read(candidate, read_as, partial))
            if code == _INCOMPATIBLE:
                return self._incompatible(candidate, message, target, iterator, initial_data, init,
                                          relayouts)
            if code == _CORRUPT:
                logging.warning("the checkpoint at step %d in %s is unreadable (%s)%s", candidate,
                                self.directory, message,
                                "" if self.read_only else "; trying the previous one")
                corrupt.append((candidate, message))
                continue
            restored = self._restored
            self._restored = None
            if relayout is not None:
                logging.info("the checkpoint at step %d holds %s: converting it to this config's "
                             "layout", candidate, relayout.name)
                restored = relayout.convert(restored, target)
            for bad, reason in corrupt:
                self._set_aside(bad, "corrupt", reason)
            self._set_aside_uncommitted()
            logging.info("restored the checkpoint at step %d from %s", candidate, self.directory)
            return candidate, restored
        if iterator is not None:
            set_data_state(iterator, json.dumps(initial_data) if not isinstance(initial_data, bytes)
                           else initial_data.decode())
        if corrupt:
            listing = "; ".join(f"step {s}: {m}" for s, m in corrupt)
            if init is None or self.on_mismatch == "stop":
                raise NoRestorableCheckpointError(
                    f"none of the checkpoints in {self.directory} can be read ({listing}). Nothing "
                    "was moved or deleted. " + (
                        "Restore the files" if init is None else
                        "Restore the files, or set checkpoint.on_mismatch='start_fresh' to start "
                        f"this run over at step 0 with these kept under {self.set_aside_dir}, or "
                        "use a new --workdir"))
            for s, m in corrupt:
                self._set_aside(s, "corrupt", m)
            logging.warning("checkpoint.on_mismatch=%s and no checkpoint can be read: starting at "
                            "step 0; the unreadable ones are kept in %s", self.on_mismatch,
                            self.set_aside_dir)
        if init is None:
            return None
        self._set_aside_uncommitted()
        logging.info("no checkpoint in %s: starting from step 0", self.directory)
        return 0, init()

    def _layout(self, step: int, target, partial: bool,
                relayouts: Sequence[Relayout]) -> tuple[Any, Relayout | None]:
        """(the target to read `step` into, the relayout that target is or None): target's
        layout, or the first relayout whose tree the checkpoint holds exactly (an unreadable
        tree is left to _verdict to report)."""
        if not relayouts:
            return target, None
        try:
            stored = self._stored_tree(step)
        except (OSError, ValueError, KeyError, TypeError):
            return target, None
        if not _tree_differences(stored, _leaf_table(target), partial):
            return target, None
        for relayout in relayouts:
            other = relayout.make_target()
            if not _tree_differences(stored, _leaf_table(other), partial):
                return other, relayout
        return target, None

    def _verdict(self, step: int, target, iterator, partial: bool) -> tuple[int, str]:
        """This process's verdict on `step` from checksums, metadata, config and data state."""
        step_dir = self.directory / str(step)
        try:
            problem = verify_manifest(step_dir, jax.process_index(), jax.process_count())
        except FileNotFoundError:
            problem = None
            if not (step_dir / MANIFEST_FILE).exists():
                logging.warning("the checkpoint at step %d has no %s (written by an older version, "
                                "or the run stopped right after committing it): restoring it "
                                "unverified", step, MANIFEST_FILE)
        except (OSError, ValueError, KeyError) as e:
            problem = f"{MANIFEST_FILE}: {type(e).__name__}: {e}"
        if problem:
            return _CORRUPT, problem
        try:
            stored_tree = self._stored_tree(step)
            stored_config = None
            if (step_dir / "config").exists():
                stored_config = ocp.JsonCheckpointHandler().restore(step_dir / "config")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return _CORRUPT, f"{type(e).__name__}: {str(e)[:300]}"
        differences = []
        leaves = _tree_differences(stored_tree, _leaf_table(target), partial)
        if stored_config is not None and self.config is not None:
            differences = config_differences(stored_config, self.config)
            if leaves:   # the state differs: a "resumable" field may be why (grad_clip_norm)
                differences += [f"{d} (may change on resume)" for d in config_differences(
                    stored_config, self.config, resumable=()) if d not in differences]
        if leaves or differences:
            return _INCOMPATIBLE, self._mismatch_message(step, differences, leaves,
                                                         stored_config is not None)
        if iterator is not None:
            try:
                text = read_data_state(step_dir / "data")
            except IncompatibleCheckpointError as e:
                return _INCOMPATIBLE, self._mismatch_message(step, [str(e)], [], True)
            except (OSError, ValueError) as e:
                return _CORRUPT, f"data state: {type(e).__name__}: {e}"
            try:
                set_data_state(iterator, text)
            except ValueError as e:   # the loader's own refusal (seed, dataset size, version)
                return _INCOMPATIBLE, self._mismatch_message(step, [f"data state: {e}"], [], True)
        return _OK, ""

    def _stored_tree(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The leaf table of `step`'s stored state; read once per restore() (each read is a
        round trip on gs://). An unreadable tree raises, and is read again if asked again."""
        if step not in self._trees:
            path = self.directory / str(step) / "state"
            self._trees[step] = _leaf_table(ocp.StandardCheckpointHandler().metadata(path).tree)
        return self._trees[step]

    def _read(self, step: int, target, partial: bool) -> tuple[int, str]:
        """Restores the arrays (collective); kept in self._restored until all agree."""
        if partial:
            args = ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target),
                                          partial_restore=True)
        else:
            args = ocp.args.StandardRestore(target)
        try:
            self._restored = self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return _CORRUPT, f"{type(e).__name__}: {str(e)[:300]}"
        return _OK, ""

    def _mismatch_message(self, step: int, differences: list[str], leaves: list[str],
                          has_config: bool) -> str:
        what = "; ".join(differences) if differences else (
            "no run-defining config field differs, so the code that wrote it built another state"
            if has_config else "it stores no config (older version)")
        return (f"the checkpoint at step {step} in {self.directory} does not fit this config: "
                f"{what}" + (f" (state leaves: {'; '.join(leaves)})" if leaves else ""))

    def _ways_out(self, step: int, training: bool) -> str:
        """What a user can do about a mismatch; a reader (export, sampling) can only match the
        config of the run that wrote the checkpoint."""
        restore = ("restore those values (the checkpoint's config: "
                   f"{self.directory / str(step) / 'config'})")
        if not training:
            return f". Nothing was moved. Way out: {restore}"
        return (f". Nothing was moved. Ways out: {restore}; or use a new --workdir; or set "
                "checkpoint.on_mismatch='start_fresh' (start at step 0, the old checkpoints kept "
                f"in {self.set_aside_dir}) or 'load_params' (fine-tune: its params and EMA with a "
                "fresh optimizer and data state, from step 0)")

    def _incompatible(self, step: int, message: str, target, iterator, initial_data, init,
                      relayouts: Sequence[Relayout]):
        if init is None or self.read_only or self.on_mismatch == "stop":
            raise IncompatibleCheckpointError(
                message + self._ways_out(step, training=init is not None and not self.read_only))
        state = init()
        if self.on_mismatch == "load_params":
            subtrees = lambda t: {"params": t.params, "ema_params": t.ema_params}  # noqa: E731
            wanted = subtrees(target)
            # In this config's layout or another (its relayouts, on the same subtrees).
            read_as, relayout = self._layout(
                step, wanted, True, [Relayout(lambda r=r: subtrees(r.make_target()), r.convert,
                                              r.name) for r in relayouts])
            leaves = _tree_differences(self._stored_tree(step), _leaf_table(read_as), partial=True)
            code, detail = _agree(_INCOMPATIBLE if leaves else _OK, "; ".join(leaves))
            if code == _OK:
                code, detail = _agree(*self._read(step, read_as, partial=True))
            if code != _OK:
                raise IncompatibleCheckpointError(
                    f"checkpoint.on_mismatch='load_params': the params at step {step} do not fit "
                    f"this model either ({detail}); use a new --workdir")
            loaded, self._restored = self._restored, None
            if relayout is not None:
                loaded = relayout.convert(loaded, wanted)
            state = state.replace(**loaded)
        if iterator is not None:
            set_data_state(iterator, json.dumps(initial_data) if not isinstance(initial_data, bytes)
                           else initial_data.decode())
        for s in sorted(self.manager.all_steps()):
            self._set_aside(s, "superseded", message)
        self._set_aside_uncommitted()
        logging.warning("checkpoint.on_mismatch=%s: starting at step 0%s; the old checkpoints are "
                        "kept in %s (%s)", self.on_mismatch,
                        " from the params of step %d" % step if self.on_mismatch == "load_params"
                        else "", self.set_aside_dir, message)
        return 0, state

    def _set_aside_uncommitted(self) -> None:
        """Saves a killed run left half-written; done once the restore decided to go on."""
        if self.read_only:
            return
        if jax.process_index() == 0 and self.directory.exists():
            for tmp in sorted(self.directory.glob(f"*{_TMP_MARK}*")):
                self._move(tmp, "incomplete")
        _barrier("checkpoint_set_aside_uncommitted")

    def _set_aside(self, step: int, reason: str, detail: str) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            target = self._move(self.directory / str(step), reason)
            logging.warning("moved the checkpoint at step %d to %s (%s)", step, target, detail)
        _barrier(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def _move(self, path: epath.Path, reason: str) -> epath.Path:
        """Renames `path` into the set-aside folder under a name never used before."""
        self.set_aside_dir.mkdir(parents=True, exist_ok=True)
        k = 1
        while (self.set_aside_dir / f"{path.name}.{reason}.{k}").exists():
            k += 1
        target = self.set_aside_dir / f"{path.name}.{reason}.{k}"
        path.rename(target)
        return target

    # ------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-process runs, TPU maintenance events)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for the last save; CheckpointSaveError when it did not commit."""
        try:
            failure = self._settle()
            self._wait_for_manifest()
        finally:
            self._hashing.shutdown(wait=True)
            self.manager.close()
        if failure is not None:
            raise CheckpointSaveError(f"the checkpoint save at step {failure[0]} to "
                                      f"{self.directory / str(failure[0])} failed: {failure[1]}")


def restore_params(workdir, target: Mapping[str, Any], *, config=None, step: int | None = None,
                   relayouts: Sequence[Relayout] = ()) -> tuple[int, Any]:
    """(step, the `target` subtrees of the train state) of a training run, read only.

    target: e.g. {"ema_params": ShapeDtypeStructs, "step": ShapeDtypeStruct(())}; leaves with
    a sharding restore onto it, others as host numpy. step None: the newest that restores.
    relayouts: other layouts of those subtrees a checkpoint may hold (Checkpointer.restore).
    Raises FileNotFoundError (no checkpoints), IncompatibleCheckpointError (config differs),
    NoRestorableCheckpointError (none readable). Moves nothing.
    """
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        raise FileNotFoundError(f"no training checkpoints in {directory}: pass the --workdir "
                                "of a training run (or train first)")
    ckpt = Checkpointer(workdir, config=config, read_only=True)
    try:
        if not ckpt.manager.all_steps():
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        restored = ckpt.restore(dict(target), step=step, partial=True, relayouts=relayouts)
    finally:
        ckpt.close()
    if restored is None:
        raise NoRestorableCheckpointError(f"no checkpoint in {directory} can be read")
    return restored


class SigtermFlag:
    """Set when the process receives SIGTERM, so the loop can save and exit cleanly.

    Only installed for single-process runs: with jax.distributed running, JAX's own
    preemption notifier turns SIGTERM into a sync point all processes agree on
    (`Checkpointer.reached_preemption`).
    """

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
        self.received = True

    def restore_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def unique_path(directory: epath.Path, stem: str, suffix: str) -> epath.Path:
    """directory/stem+suffix, or stem.2+suffix, ... : a name no file has yet."""
    path, k = directory / f"{stem}{suffix}", 1
    while path.exists():
        k += 1
        path = directory / f"{stem}.{k}{suffix}"
    return path


def write_config_history(workdir, config, start_step: int) -> epath.Path:
    """config.json (the first start's, written once) and config-<start step>.json for every
    start, never overwriting either (process 0)."""
    workdir = epath.Path(workdir)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = unique_path(workdir, f"config-{start_step}", ".json")
    if jax.process_index() == 0:
        if not (workdir / "config.json").exists():
            (workdir / "config.json").write_text(text)
        path.write_text(text)
    return path

