"""Device meshes and shardings: the one place that decides how arrays are laid out.

The mesh has two axes, 'data' and 'fsdp'. Batches are sharded over both; parameters are
replicated (pure data parallel) unless the logical-axis rules map a parameter axis to
'fsdp'. Meshes use Auto axis types (linen code is written for them; jax.make_mesh
defaults to Explicit).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


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
