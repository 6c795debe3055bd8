"""Programs that do not fit in device memory: reading XLA's out-of-memory errors, and the one
message that names what was asked and the config knobs that make the step smaller.

Shared by `--mode=compile` (a TPU program compiled on any host) and training (the first
compile on the devices themselves), so both say the same thing.
"""

from __future__ import annotations

import re


class DoesNotFitError(ValueError):
    """The compiled program needs more device memory than a device has."""


# XLA:TPU's out-of-memory errors: "... HLO temporaries (53.70G) exceeds available HBM (15.75G)"
# and "Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm".
_OOM = (re.compile(r"\(([\d.]+)([KMGT]?)\)\s+exceeds available HBM\s+\(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.IGNORECASE))


def oom_bytes(message: str) -> tuple[int, int] | None:
    """(needed, capacity) bytes from XLA:TPU's out-of-memory message; None for other errors."""
    for pattern in _OOM:
        if m := pattern.search(message):
            scale = lambda unit: 1024 ** " KMGT".index(unit.upper() or " ")
            return (int(float(m.group(1)) * scale(m.group(2))),
                    int(float(m.group(3)) * scale(m.group(4))))
    return None


def is_out_of_memory(message: str) -> bool:
    """XLA's out-of-memory errors on any backend (TPU's above; GPU/CPU RESOURCE_EXHAUSTED)."""
    return oom_bytes(message) is not None or ("RESOURCE_EXHAUSTED" in message
                                              and "memory" in message.lower())


def gib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def knobs(*, train: bool, remat: bool, remat_keeps: str, shard_update: bool) -> str:
    """The config changes that make a step need less memory per device, as one phrase."""
    out = ["--config.mesh.rules=fsdp with --config.mesh.fsdp=<chips> (shards params and "
           "optimizer state)"]
    if train and not shard_update:
        out.append("--config.mesh.shard_update=True (optimizer state and EMA split over the "
                   "data-parallel chips)")
    if not remat:
        out.append("--config.model.remat=True (fewer activations)")
    elif remat_keeps != "inputs":
        out.append("--config.model.remat_keeps=inputs (remat keeps only block inputs)")
    out += ["a smaller per-chip batch (--config.batch_size, or "
            "--config.optimizer.grad_accum_steps)", "more chips"]
    return ", ".join(out[:-1]) + ", or " + out[-1]


def does_not_fit(step: str, device_kind: str, needed: int | None, capacity: int | None, *,
                 at_least: bool, global_batch: int, per_device: float, mesh, unit: str,
                 train: bool, remat: bool, remat_keeps: str, shard_update: bool) -> str:
    """The one message of a step that does not fit: what it needs and where, what was asked,
    and the `knobs` for its config. needed None: the error gave no sizes (GPU/CPU). unit:
    "chip" or "device"."""
    if needed is None:
        head = f"{step} does not fit in the memory of a {device_kind}"
    else:
        head = (f"{step} needs {'at least ' if at_least else ''}{gib(needed)} per {unit} but a "
                f"{device_kind} has {gib(capacity)}")
    return (f"{head} (global batch {global_batch}, {per_device:g} per {unit}, mesh {mesh}); try "
            + knobs(train=train, remat=remat, remat_keeps=remat_keeps, shard_update=shard_update))
