"""Device meshes and shardings: the one place that decides how arrays are laid out.

The mesh has two axes, 'data' and 'fsdp'. Batches are sharded over both; parameters are
replicated (pure data parallel) unless the logical-axis rules map a parameter axis to
'fsdp'. Meshes use Auto axis types (linen code is written for them; jax.make_mesh
defaults to Explicit).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices (-1: one per core; 0: leave JAX's default
    of one). Only the CPU backend reads it, and only when it starts: call before anything
    touches a device (main.py does, from config.mesh.cpu_devices)."""
    if count == 0:
        return
    if count < -1:
        raise ValueError(f"mesh.cpu_devices={count}; use -1 (one per core), 0 (default) or N > 0")
    count = len(os.sched_getaffinity(0)) if count == -1 else count
    if jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:   # jax refuses once the CPU backend has started
        raise RuntimeError(f"mesh.cpu_devices={count} must be set before JAX starts its CPU "
                           f"backend ({e})") from e


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (all devices by default).

    A size of -1 is filled from the device count. Raises ValueError when the sizes do not
    multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1 (auto)")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"mesh: data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} but there are {n} "
                         "devices; set mesh.data/mesh.fsdp to multiply to the device count (or -1)")
    return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis sharded over every mesh axis; other axes replicated."""
    return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch_from_local(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """A global jax.Array sharded over the batch from this process's slice of the batch."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(local)), local)


def shard_batch(mesh: Mesh, x: np.ndarray | jax.Array) -> jax.Array:
    """Places a full (host-identical) batch onto the mesh, sharded over its leading axis."""
    if x.shape[0] % mesh.size:
        raise ValueError(f"batch of {x.shape[0]} is not divisible by the {mesh.size} devices")
    return jax.device_put(x, batch_sharding(mesh, np.ndim(x)))


# ----------------------------------------------------------------------------------------
# Logical-axis rules: parameter axis names (see models/layers.py) -> mesh axes.
#
# Rules are data: a sequence of (logical name, mesh axis or None) pairs, usually read from
# config.mesh.rules. A logical name may appear several times; for each parameter dimension
# the first rule whose mesh axis is still unused in that parameter and divides the dimension
# wins, otherwise the dimension is replicated (a 1-channel stem conv stays whole under FSDP).

RULE_PRESETS: dict[str, tuple[tuple[str, str | None], ...]] = {
    # Every parameter replicated; only the batch is split.
    "data_parallel": (),
    # ZeRO-3 style: each parameter split over 'fsdp' along its first shardable width axis.
    "fsdp": (("embed", "fsdp"), ("mlp", "fsdp"), ("vocab", "fsdp"), ("heads", "fsdp")),
}


def resolve_rules(rules) -> tuple[tuple[str, str | None], ...]:
    """A preset name ('data_parallel', 'fsdp') or explicit (logical, mesh axis) pairs."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"mesh.rules={rules!r} is not a preset; use one of "
                             f"{sorted(RULE_PRESETS)} or a list of (logical, mesh_axis) pairs")
        return RULE_PRESETS[rules]
    pairs = tuple((str(name), None if axis is None else str(axis)) for name, axis in rules)
    for name, axis in pairs:
        if axis is not None and axis not in DATA_AXES:
            raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; "
                             f"mesh axes are {DATA_AXES}")
    return pairs


def spec_for(logical: P | None, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """Mesh PartitionSpec for one parameter from its logical spec and shape."""
    if logical is None or len(logical) == 0:
        return P()
    used: set[str] = set()
    out = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        chosen = None
        for rule_name, axis in rules:
            if rule_name != name or axis is None or axis in used:
                continue
            if mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0:
                chosen = axis
                break
        if chosen is not None:
            used.add(chosen)
        out.append(chosen)
    return P(*out)


def logical_to_shardings(logical_specs, abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of arrays given its tree of logical PartitionSpecs.

    logical_specs: a tree like `abstract_tree` whose leaves are PartitionSpecs of logical
      names (flax `nn.get_partition_spec`; P() for unannotated leaves).
    abstract_tree: arrays or ShapeDtypeStructs (their shapes decide divisibility).
    """
    rules = resolve_rules(rules)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, spec_for(spec, x.shape, mesh, rules)),
                        logical_specs, abstract_tree,
                        is_leaf=lambda s: isinstance(s, P) or s is None)


# ----------------------------------------------------------------------------------------
# Multi-host initialisation.

def _on_cloud_tpu_vm() -> bool:
    import glob
    import os
    return bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.path.exists("/dev/accel0")
                or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> None:
    """Starts jax.distributed when this run has several processes; no-op otherwise.

    Explicit arguments (GPU clusters without SLURM; tests on 127.0.0.1) win. Otherwise a
    SLURM job with several tasks and any Cloud TPU VM (pod workers included) are
    auto-detected by JAX itself. Under SLURM, JAX gives each process the one GPU of its
    local rank; with one process per node pass local_device_ids (all the node's GPUs).
    Must run before anything touches a device.
    """
    import os
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("give all of --coordinator_address, --num_processes and --process_id "
                             "(or none of them to auto-detect SLURM / Cloud TPU)")
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                       local_device_ids=local_device_ids)
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_cloud_tpu_vm():
        jax.distributed.initialize(local_device_ids=local_device_ids)


# ----------------------------------------------------------------------------------------
# Device facts for throughput reporting.

# Peak dense bf16 TFLOP/s per device of accelerators we know, for MFU.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
                    "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def device_kind() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def peak_tflops_per_device() -> float | None:
    """The bf16 peak of this device kind (None when unknown, e.g. CPUs)."""
    kind = device_kind().lower()
    for key, value in PEAK_TFLOPS_BF16.items():
        if key.lower() in kind:
            return value
    return None
