"""Training checkpoints: an orbax CheckpointManager for the train state and the data iterator.

Layout under `<workdir>/checkpoints/<step>/`:
  state/   the TrainState pytree (params, EMA params, optimizer state, step, PRNG key),
           written asynchronously by orbax, each process writing its own shards
  data/    one JSON file per process with that process's data-iterator state

Restores always target abstract arrays carrying the *current* shardings, so a checkpoint
written on 8 devices restores on 4 (or on a pod). A latest checkpoint that cannot be read
is moved aside to `<workdir>/checkpoints_unreadable/` with a warning and the previous one
is used instead.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


# ----------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process (iterators are per-process objects).

class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (a JSON-able dict, or bytes of JSON) per process."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
        state = args.iterator.get_state()
        text = state.decode() if isinstance(state, bytes) else json.dumps(state)
        self._file(directory).write_text(text)

    def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
        path = self._file(directory)
        if path.exists():
            text = path.read_text()
        else:
            # Written by another number of processes: fine when every process saved the same
            # state (udit_jax.data's loaders and SyntheticBatches count global positions).
            texts = {p.read_text() for p in directory.glob("process_*.json")}
            if len(texts) != 1:
                raise ValueError(
                    f"{directory} holds per-process data states {sorted(p.name for p in directory.glob('*.json'))} "
                    f"that differ, so they cannot be mapped onto {jax.process_count()} processes; "
                    "resume with the process count that wrote them")
            text = texts.pop()
        # grain's DataLoaderIterator speaks bytes of JSON, dataset iterators speak dicts.
        wants_bytes = isinstance(args.iterator.get_state(), bytes)
        args.iterator.set_state(text.encode() if wants_bytes else json.loads(text))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any


# ----------------------------------------------------------------------------------------

class Checkpointer:
    """Keeps the last `keep` checkpoints plus every `keep_every`-th step, asynchronously."""

    def __init__(self, workdir: epath.Path, *, keep: int, keep_every: int | None,
                 async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.unreadable_dir = epath.Path(workdir) / "checkpoints_unreadable"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"),
                                             options=options)

    def save(self, step: int, state: Any, iterator: Any) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataIteratorSave(iterator)), force=True)

    def restore_latest(self, abstract_state: Any, iterator: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest readable checkpoint, or None when there is none.

        abstract_state: jax.ShapeDtypeStructs with the target shardings (the current mesh).
        iterator: its state is set in place (None: the data state is not read).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if iterator is not None:
                items["data"] = DataIteratorRestore(iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure to read means "unusable"
                logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); moving it to "
                                "%s and falling back to the previous checkpoint", step,
                                self.directory, type(e).__name__, str(e)[:300], self.unreadable_dir)
                self._move_aside(step)
                continue
            return step, restored["state"]
        return None

    def _move_aside(self, step: int) -> None:
        # Removing the step from the manager's view lets training save that step again later.
        if jax.process_index() == 0:
            self.unreadable_dir.mkdir(parents=True, exist_ok=True)
            target = self.unreadable_dir / str(step)
            if target.exists():
                target.rmtree()
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-process runs, TPU maintenance events)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
