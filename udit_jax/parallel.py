"""Device meshes and shardings: the one place that decides how arrays are laid out.

The mesh is config data (config.mesh): `axes` names the mesh axes, outermost first, and
each axis's size is the config field of that name (-1: the devices left over). The default
is ('data', 'fsdp'). Batches are sharded over the data-parallel axes ('data', 'fsdp');
any further axis (e.g. 'tensor') sees the whole batch and holds parameter shards where the
logical-axis rules (config.mesh.rules) map a parameter axis to it. Parameters are
replicated (pure data parallel) unless a rule maps them. Meshes use Auto axis types (linen
code is written for them; jax.make_mesh defaults to Explicit).
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import math
import os
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from udit_jax import paths

DATA_AXES = ("data", "fsdp")   # mesh axes the batch is split over (when the mesh has them)


def host_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices (-1: one per core; 0: leave JAX's default
    of one). Only the CPU backend reads it, and only when it starts: call before anything
    touches a device (main.py does, from config.mesh.cpu_devices)."""
    if count == 0:
        return
    if count < -1:
        raise ValueError(f"mesh.cpu_devices={count}; use -1 (one per core), 0 (default) or N > 0")
    count = host_cores() if count == -1 else count
    if jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:   # jax refuses once the CPU backend has started
        raise RuntimeError(f"mesh.cpu_devices={count} must be set before JAX starts its CPU "
                           f"backend ({e})") from e


def skip_tpu_backend_without_tpu() -> bool:
    """On a machine without TPU chips that has libtpu installed (the [tpu] extra, for
    --mode=compile), JAX would load libtpu when its backends start, which prints a page of
    errors about TPU worker hostnames before falling back to the CPU. Sets JAX_PLATFORMS to
    CUDA then CPU there (the GPU is still used where its plugin is installed); True when it
    did. Leaves a JAX_PLATFORMS the user set alone; call before anything touches a device."""
    import importlib.util
    if os.environ.get("JAX_PLATFORMS") or on_cloud_tpu_vm():
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    os.environ["JAX_PLATFORMS"] = "cuda,cpu"
    jax.config.update("jax_platforms", "cuda,cpu")
    return True


def build_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of named axes [(name, size), ...], outermost first, over `devices` (all by default).

    One size may be -1 (filled from the device count). Raises ValueError when the sizes do
    not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    names = [str(name) for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    described = ", ".join(f"{a}={s}" for a, s in zip(names, sizes))
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mesh axes {names} must be distinct and at least one")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis size may be -1 (auto), got {described}")
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {described}")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if n % rest:
            raise ValueError(f"mesh: {described} does not divide the {n} devices")
        sizes[sizes.index(-1)] = n // rest
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh: {described} gives {int(np.prod(sizes))} devices but there are {n}; "
                         "set the mesh sizes (config.mesh) to multiply to the device count (or -1)")
    axis_types = (AxisType.Auto,) * len(names)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        return Mesh(_over_slices(sizes, devices, num_slices), tuple(names), axis_types=axis_types)
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=axis_types, devices=devices)


def _over_slices(sizes: list[int], devices: list, num_slices: int) -> np.ndarray:
    """The device array of a mesh over several TPU slices (multi-slice): the slices split the
    outermost axes first (the data axis by default, so that only the gradients' all-reduce
    crosses the data-center network between slices); each slice's share is laid out on its
    own chips by their topology. (jax.make_mesh lays out one slice only: it failed on an
    assertion.) The sizes multiply to the device count, a multiple of num_slices, so the
    slices always divide into them."""
    from jax.experimental import mesh_utils
    across, left = [], num_slices
    for size in sizes:
        across.append(math.gcd(left, size))
        left //= across[-1]
    within = [size // a for size, a in zip(sizes, across)]
    return mesh_utils.create_hybrid_device_mesh(within, across, devices)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh (see build_mesh); all devices on 'data' by default."""
    return build_mesh((("data", data), ("fsdp", fsdp)), devices)


def mesh_from_config(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh config.mesh describes: axes `mesh_config.axes`, sizes `mesh_config[name]`."""
    missing = [a for a in mesh_config.axes if a not in mesh_config]
    if missing:
        raise ValueError(f"mesh.axes names {missing} without a size; add config.mesh.<axis> = N")
    return build_mesh([(a, mesh_config[a]) for a in mesh_config.axes], devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def batch_ways(mesh: Mesh) -> int:
    """How many ways a batch is split (the devices on the data-parallel axes)."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis sharded over the data-parallel mesh axes; other axes replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch_from_local(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """A global jax.Array sharded over the batch from this process's slice of the batch."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(local)), local)


def shard_batch(mesh: Mesh, x: np.ndarray | jax.Array) -> jax.Array:
    """Places a full (host-identical) batch onto the mesh, sharded over its leading axis."""
    ways = batch_ways(mesh)
    if x.shape[0] % ways:
        raise ValueError(f"batch of {x.shape[0]} is not divisible by the {ways} data-parallel devices")
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


def resolve_rules(rules, mesh_axes: Sequence[str] = DATA_AXES) -> tuple[tuple[str, str | None], ...]:
    """A preset name ('data_parallel', 'fsdp') or explicit (logical, mesh axis) pairs whose
    mesh axes are among `mesh_axes`."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"mesh.rules={rules!r} is not a preset; use one of "
                             f"{sorted(RULE_PRESETS)} or a list of (logical, mesh_axis) pairs")
        return RULE_PRESETS[rules]
    pairs = tuple((str(name), None if axis is None else str(axis)) for name, axis in rules)
    for name, axis in pairs:
        if axis is not None and axis not in mesh_axes:
            raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; "
                             f"mesh axes are {tuple(mesh_axes)}")
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


def update_sharding(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """The sharding of an optimizer-state or EMA leaf whose parameter has `sharding`, when the
    update is split (config.mesh.shard_update; ZeRO-1 style): the data-parallel mesh axes the
    parameter does not use are added on its first whole dimension they divide, so each
    data-parallel device updates only its part (the parameter itself stays as it is).
    Unchanged when no dimension is divisible."""
    mesh, spec = sharding.mesh, sharding.spec
    dims = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for d in dims if d is not None for a in (d if isinstance(d, tuple) else (d,))}
    free = tuple(a for a in batch_axes(mesh) if a not in used and mesh.shape[a] > 1)
    ways = int(np.prod([mesh.shape[a] for a in free]))
    if ways == 1:
        return sharding
    for i, (d, size) in enumerate(zip(dims, shape)):
        if d is None and size % ways == 0:
            dims[i] = free if len(free) > 1 else free[0]
            return NamedSharding(mesh, P(*dims))
    return sharding


def activation_rules(mesh: Mesh) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """flax logical-axis rules for the models' activation names (models/layers.py
    ACTIVATION_AXES): the batch over the data-parallel axes; the other axes whole."""
    return (("activation_batch", batch_axes(mesh)),)


def logical_to_shardings(logical_specs, abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of arrays given its tree of logical PartitionSpecs.

    logical_specs: a tree like `abstract_tree` whose leaves are PartitionSpecs of logical
      names (flax `nn.get_partition_spec`; P() for unannotated leaves).
    abstract_tree: arrays or ShapeDtypeStructs (their shapes decide divisibility).
    """
    rules = resolve_rules(rules, mesh.axis_names)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, spec_for(spec, x.shape, mesh, rules)),
                        logical_specs, abstract_tree,
                        is_leaf=lambda s: isinstance(s, P) or s is None)


# ----------------------------------------------------------------------------------------
# Multi-host initialisation.

def on_cloud_tpu_vm() -> bool:
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
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or on_cloud_tpu_vm():
        jax.distributed.initialize(local_device_ids=local_device_ids)


# ----------------------------------------------------------------------------------------
# Device facts for throughput reporting.

# Per device of accelerators we know: peak dense bf16 TFLOP/s (for MFU) and HBM GiB (for
# memory fit; None where the product comes in several sizes). Looked up by a substring of
# device_kind, first match wins ("TPU v5 lite" before "TPU v5"). TPU v4/v5p devices are whole
# (megacore) chips.
DEVICE_FACTS: dict[str, tuple[float, float | None]] = {
    "H100": (989.0, None), "H200": (989.0, 141.0), "A100": (312.0, None),
    "TPU v4": (275.0, 32.0), "TPU v5 lite": (197.0, 16.0), "TPU v5e": (197.0, 16.0),
    "TPU v5p": (459.0, 95.0), "TPU v5": (459.0, 95.0), "TPU v6 lite": (918.0, 32.0),
    "TPU v6e": (918.0, 32.0)}


def use_compilation_cache(compile_config) -> str | None:
    """Turns on JAX's persistent compilation cache for this process (before its first compile)
    as compile.cache / compile.cache_dir say (and JAX_ENABLE_COMPILATION_CACHE=false lets
    it be); returns the directory, None when off.

    "" means $JAX_COMPILATION_CACHE_DIR when set, else <user cache>/xla. JAX writes entries
    from process 0 only (a pod shares them through a gs:// directory) and only for programs
    that took a second or more; an unreadable or unwritable entry is a warning and a
    compile, never an error. A local directory that cannot be created turns the cache off
    with one warning."""
    if not (compile_config.cache and jax.config.jax_enable_compilation_cache):
        return None
    cache_dir = (compile_config.cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(paths.user_cache_dir(), "xla"))
    if not paths.is_url(cache_dir):
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            logging.warning("compiling without a persistent cache: cannot create %s (%s); set "
                            "--config.compile.cache_dir=DIR, or --config.compile.cache=False",
                            cache_dir, e.strerror or e)
            return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    logging.info("XLA compilation cache: %s (--config.compile.cache=False turns it off)", cache_dir)
    return cache_dir


@contextlib.contextmanager
def without_compilation_cache() -> Iterator[None]:
    """JAX's persistent compilation cache off inside the block, as it was after it: for
    compiles whose time is the result (--mode=compile). JAX_COMPILATION_CACHE_DIR turns the
    cache on without use_compilation_cache; then a TPU program compiled on a CPU host was
    written to the cache (never readable there: a warning on the next run) and, on a TPU VM,
    read back, reporting the read as the compile time."""
    if jax.config.jax_compilation_cache_dir is None or not jax.config.jax_enable_compilation_cache:
        yield   # no cache to bypass
        return
    from jax.experimental.compilation_cache import compilation_cache

    def decide_again():   # JAX decides once per process whether it uses the cache
        jax_log = std_logging.getLogger("jax._src.compilation_cache")
        level = jax_log.level
        jax_log.setLevel(std_logging.WARNING)   # not its INFO line on each reset
        try:
            compilation_cache.reset_cache()
        finally:
            jax_log.setLevel(level)

    jax.config.update("jax_enable_compilation_cache", False)
    decide_again()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        decide_again()


def forms_device(mesh: Mesh | None) -> tuple[str, str]:
    """(platform, device_kind) of a mesh's devices ('tpu', 'TPU v5 lite'; a TPU topology's on
    a CPU host too), or of JAX's default backend's when mesh is None: what models.forms_for
    takes."""
    d = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    return d.platform, getattr(d, "device_kind", d.platform)


def device_kind() -> str:
    return forms_device(None)[1]


def device_facts(kind: str) -> tuple[float, int | None] | None:
    """(peak bf16 TFLOP/s, HBM bytes or None) of a device kind; None when unknown (CPUs)."""
    for key, (peak, hbm_gib) in DEVICE_FACTS.items():
        if key.lower() in kind.lower():
            return peak, None if hbm_gib is None else int(hbm_gib * 2**30)
    return None


def peak_tflops_per_device() -> float | None:
    """The bf16 peak of this device kind (None when unknown, e.g. CPUs)."""
    facts = device_facts(device_kind())
    return None if facts is None else facts[0]
