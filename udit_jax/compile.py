"""Compile the real train step for a TPU topology on any host: memory fit, compile time, cost.

    python -m udit_jax.main --config=configs/udit_l.py --workdir=DIR --mode=compile \\
        --config.compile.topology=v5p-256

With libtpu installed (`pip install 'udit-jax[tpu]'`) the TPU compiler runs on a CPU host:
`jax.experimental.topologies` describes the slice's devices, the mesh is built from them by
the same `config.mesh` rules as training, and the train step (the real state shardings and
global batch) is lowered and compiled to the TPU executable. Its memory analysis gives the
HBM per chip, its cost analysis XLA's FLOP count and the cost model's step time. The report
is printed and written to DIR/compile/<topology>.json (with compile.save_executable=True the
compiled train step too, DIR/compile/<topology>.executable, which a training run with the same
--workdir on that topology loads instead of compiling); a program that does not fit raises
`memory_fit.DoesNotFitError` after writing it (main prints one line, exit status non-zero).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from udit_jax import config as config_lib
from udit_jax import executables, hlo_cost, memory_fit, parallel
from udit_jax import sampler as sampler_lib

# Cloud TPU generation -> (libtpu's topology prefix, mesh dimensions, TensorCores per chip in
# the accelerator-type name "<gen>-<N>"). v4/v5p names count TensorCores (v5p-8 = 4 chips), and
# their chips are compiled as one megacore device; v5e/v6e names count chips.
_GENERATIONS = {
    "v4": ("v4", 3, 2),
    "v5p": ("v5", 3, 2),
    "v5e": ("v5e", 2, 1),
    "v5litepod": ("v5e", 2, 1),
    "v6e": ("v6e", 2, 1),
}
_KNOWN = "v4-8, v5p-128, v5e-16 / v5litepod-16, v6e-256, or a shape like v5p:4x4x8 / v5e:2x4"


class TopologyError(ValueError):
    """The topology name is not one we can compile for."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                  # as asked: "v5p-8" or "v5p:2x2x1"
    generation: str            # "v4", "v5p", "v5e", "v6e"
    shape: tuple[int, ...]     # chips along each torus/mesh dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{_GENERATIONS[self.generation][0]}:" + "x".join(map(str, self.shape))

    @property
    def megacore(self) -> bool:
        return _GENERATIONS[self.generation][2] == 2

    @property
    def wraparound(self) -> tuple[bool, ...]:
        """Torus links: full v4/v5p cubes from 4x4x4 up; v5e/v6e dimensions of 16 chips."""
        if len(self.shape) == 3:
            return (min(self.shape) >= 4,) * 3
        return tuple(n == 16 for n in self.shape) + (False,)


def _default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives `chips` (a power of two): 2-D a x b with a <= b; 3-D
    from 2x2x1 by doubling the smallest, latest dimension (2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    k = int(math.log2(chips))
    if dims == 2:
        return (2 ** (k // 2), 2 ** (k - k // 2))
    shape = [2, 2, 1]
    for _ in range(k - 2):
        i = max(j for j in range(3) if shape[j] == min(shape))
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """A Topology from "v5p-128" / "v5litepod-16" (Cloud TPU accelerator types) or "v5p:4x4x8"."""
    text = name.strip().lower()
    if m := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text):
        gen, count = m.group(1), int(m.group(2))
        _, dims, cores = _GENERATIONS[gen]
        chips = count // cores
        if count % cores or chips < 1 or chips & (chips - 1) or (dims == 3 and chips < 4):
            raise TopologyError(
                f"compile.topology={name!r}: {gen}-N needs N = {cores} x a power of two"
                + (" of at least 4 chips" if dims == 3 else "")
                + f"; for other slice shapes give them, e.g. {gen}:{'4x4x12' if dims == 3 else '4x8'}")
        return Topology(name, "v5e" if gen == "v5litepod" else gen, _default_shape(chips, dims))
    if m := re.fullmatch(r"(v4|v5p|v5|v5e|v5litepod|v6e):(\d+(?:x\d+)*)", text):
        gen = {"v5": "v5p", "v5litepod": "v5e"}.get(m.group(1), m.group(1))
        shape = tuple(int(n) for n in m.group(2).split("x"))
        dims = _GENERATIONS[gen][1]
        if len(shape) != dims or min(shape) < 1:
            raise TopologyError(f"compile.topology={name!r}: {gen} slices have {dims} dimensions "
                                f"(e.g. {gen}:{'2x2x1' if dims == 3 else '2x2'})")
        return Topology(name, gen, shape)
    raise TopologyError(f"compile.topology={name!r} is not a TPU topology we know; use {_KNOWN}")


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `num_slices` copies of `topology` (needs libtpu, no TPU)."""
    # No cloud metadata look-up on a host that is not a TPU VM; other processes (CPU jobs
    # that loaded libtpu on import) may hold libtpu's lock file, which compiling does not need.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not parallel.on_cloud_tpu_vm():
        # Off a TPU VM libtpu finds no worker hostnames and prints a page of errors as it
        # starts, and no host bounds (a "could not determine TPU accelerator type" warning);
        # compiling needs neither: the topology comes from get_topology_desc below (reports
        # for v5e-16, v5p-32 and 2 x v5p-16 are the same either way).
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    try:
        import libtpu  # noqa: F401 - only to give a clear message when it is missing
    except ImportError as e:
        raise TopologyError("--mode=compile needs the TPU compiler: pip install 'udit-jax[tpu]' "
                            "(libtpu for this jax)") from e
    from jax.experimental import topologies
    bounds = (1, 1, 1) if topology.chips == 1 else (2, 2, 1)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.libtpu_name,
            chip_config_name="megacore" if topology.megacore else "default",
            chips_per_host_bounds=bounds, num_slices=num_slices, wrap=topology.wraparound)
    except jax.errors.JaxRuntimeError as e:
        raise TopologyError(f"compile.topology={topology.name!r} ({topology.libtpu_name}, "
                            f"{num_slices} slice(s)): libtpu refused it: {e}") from e
    return list(desc.devices)


# ----------------------------------------------------------------------------------------
# The job.

def host_allocator(preload: str | None = None, maps: str | None = None) -> str:
    """The malloc this process compiles with: "jemalloc" or "tcmalloc" when LD_PRELOAD put one
    in it, else "glibc" ("unknown" where /proc/self/maps cannot be read). The TPU compiler
    spends about a seventh of its time in glibc's malloc; jemalloc compiles the same
    executable faster (README, "Before you rent a pod"). preload, maps: LD_PRELOAD and
    /proc/self/maps' text (default: this process's)."""
    preload = os.environ.get("LD_PRELOAD", "") if preload is None else preload
    if maps is None:
        try:
            maps = epath.Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in preload and f"lib{name}" in maps:
            return name
    return "glibc"


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                        shardings)


def _with(config, **fields):
    """A copy of config with top-level fields replaced."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for k, v in fields.items():
            config[k] = v
    return config


def _train_program(config, model, mesh):
    """(jitted train step, abstract args, images per call, model FLOPs per step, steps per
    call = 1)."""
    from udit_jax import train
    tx, schedule = config_lib.make_optimizer(config.optimizer)
    abstract, shardings = train.state_shardings(model, tx, config.seed, mesh, config.mesh.rules,
                                                config.mesh.shard_update)
    # The real batch's fields and dtypes (a one-row draw), at the global batch size.
    one = next(train.SyntheticBatches(_with(config, batch_size=1), 0, 1))
    example = {k: np.broadcast_to(v, (config.batch_size,) + v.shape[1:]) for k, v in one.items()}
    step = train.make_train_step(model, config_lib.make_objective(config), tx, schedule, config,
                                 mesh)
    jitted = train.jit_train_step(step, shardings, mesh, example)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=parallel.batch_sharding(mesh, np.ndim(v)))
             for k, v in example.items()}
    # The papers' count: backward = 2 x forward, 2 FLOPs per multiply-accumulate.
    flops = 3 * 2 * model.count_macs() * config.batch_size
    return jitted, (_abstract(abstract, shardings), batch), config.batch_size, flops, 1


def _sample_program(config, model, mesh):
    """One sampling batch of a sampling job (config.sample: sampler, steps, cfg_scale,
    per_device_batch), without the VAE decode of latent models: (jitted sampler, abstract
    args, images per call, model FLOPs per denoising step, denoising steps per call)."""
    from udit_jax import train
    settings = config_lib.sampling(config, "sample")
    process = config_lib.sampling_process(config, settings)
    fn = sampler_lib.make_batch_sampler(model, process, sampler=settings["sampler"],
                                        cfg_scale=settings["cfg_scale"],
                                        guidance_interval=settings["guidance_interval"], mesh=mesh,
                                        clip_denoised=not config_lib.is_latent(config))
    # Loop steps: the respaced diffusion's, or the transport grid's intervals.
    steps = process.num_steps - 1 if config.objective == "transport" else process.num_timesteps
    s = config.sample
    tx, _ = config_lib.make_optimizer(config.optimizer)
    abstract, shardings = train.state_shardings(model, tx, config.seed, mesh, config.mesh.rules)
    n = s.per_device_batch * mesh.size
    rows = parallel.batch_sharding(mesh, 1)
    # A sampling job restores the EMA laid out as the params (train.restore_ema_params).
    args = (_abstract(abstract.ema_params, shardings.params), None,
            jax.ShapeDtypeStruct((2,), np.uint32, sharding=parallel.replicated(mesh)),
            jax.ShapeDtypeStruct((n,), np.int32, sharding=rows),
            jax.ShapeDtypeStruct((n,), np.int32, sharding=rows))
    # XLA counts the sampling loop's body once: its FLOPs are one denoising step's.
    model_batch = n * (2 if settings["cfg_scale"] > 1 else 1)
    # The sampler runs the inference form (fused FFNs): count its MACs.
    return fn, args, n, 2 * model.inference_form().count_macs() * model_batch, steps


def _check(config, chips: int) -> None:
    c = config.compile
    if c.what not in ("train", "sample"):
        raise ValueError(f"compile.what={c.what!r}; use 'train' or 'sample'")
    if c.num_slices < 1:
        raise ValueError(f"compile.num_slices={c.num_slices} must be at least 1")
    if c.save_executable and c.what != "train":
        raise ValueError("compile.save_executable=True saves the train step; use "
                         "compile.what=train")
    if config.model.kwargs.get("attention_impl") == "cudnn":
        raise ValueError("model.kwargs.attention_impl='cudnn' is the fused attention of NVIDIA "
                         "GPUs, not TPUs: leave it unset (XLA's attention) for --mode=compile")
    accum = config.optimizer.grad_accum_steps
    if c.what == "train" and (config.batch_size % accum or (config.batch_size // accum) % chips):
        raise ValueError(f"batch_size={config.batch_size} (grad_accum_steps={accum}) does not "
                         f"split over the {chips} chips; use a multiple of {chips * accum}")


def compile_report(config, executable_path=None) -> dict[str, Any]:
    """Compiles config.compile.what for config.compile.topology; returns the report (see
    module docstring). Raises TopologyError / ValueError before compiling when the request
    cannot be compiled; a program over the HBM capacity gives a report with fits=False.
    executable_path: where to save the compiled program (udit_jax.executables)."""
    c = config.compile
    if not c.topology:
        raise TopologyError(f"set --config.compile.topology (e.g. v5p-8); known forms: {_KNOWN}")
    topology = parse_topology(c.topology)
    devices = topology_devices(topology, c.num_slices)
    chips = len(devices)
    _check(config, chips)
    mesh = parallel.mesh_from_config(config.mesh, devices)
    model = config_lib.build_model(config)
    kind = devices[0].device_kind
    peak_tflops, capacity = parallel.device_facts(kind) or (None, None)
    report: dict[str, Any] = {
        "topology": c.topology, "libtpu_topology": topology.libtpu_name,
        "num_slices": c.num_slices, "chips": chips, "device_kind": kind, "what": c.what,
        "model": config.model.name, "dtype": config.model.dtype, "remat": bool(config.model.remat),
        "remat_keeps": config.model.remat_keeps if config.model.remat else None,
        "mesh": dict(mesh.shape), "mesh_rules": config.mesh.rules
        if isinstance(config.mesh.rules, str) else [list(r) for r in config.mesh.rules],
        "shard_update": bool(config.mesh.shard_update),
        # What made the estimate: another compiler or other flags compile another program.
        "versions": executables.versions(), "compiler_flags": executables.compiler_flags(),
        "host_allocator": host_allocator(), "host_cpu_cores": parallel.host_cores(),
    }
    build = _train_program if c.what == "train" else _sample_program
    what = f"the {c.what} step of {config.model.name} for {c.topology} ({chips} x {kind})"
    # The compile is silent for minutes on a small host (U-DiT-L's v5p-8 step: 5-9 on 2 cores):
    # say what is running, and on what, before it starts.
    logging.info("lowering %s, mesh %s...", what, dict(mesh.shape))
    start, cpu_start = time.perf_counter(), time.process_time()
    fn, args, images, model_flops, steps = build(config, model, mesh)
    report["global_batch"] = images
    report["steps_per_call"] = steps
    lowered = fn.lower(*args)
    report["lowering_seconds"] = time.perf_counter() - start
    logging.info("compiling %s%s (%s malloc): minutes for an ImageNet-size model on a small "
                 "host...", what, _cores(report), report["host_allocator"])
    try:
        with parallel.without_compilation_cache():   # the compile time is the result
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        needed = memory_fit.oom_bytes(str(e))
        if needed is None:
            raise
        compiled = None  # the compiler stops at the first buffer assignment over capacity
        report["hbm_bytes_per_chip"] = {"total": needed[0]}
        report["compile_error"] = str(e).splitlines()[0]
        capacity = needed[1]
    report["compile_seconds"] = time.perf_counter() - start
    report["compile_cpu_seconds"] = time.process_time() - cpu_start
    if compiled is not None and executable_path is not None:
        report["executable"] = str(executables.save(executable_path, lowered, compiled, devices,
                                                    config))
    report["hbm_capacity_bytes"] = capacity
    if compiled is not None:
        m = compiled.memory_analysis()
        hbm = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
               "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
               "code": m.generated_code_size_in_bytes}
        # Donated arguments alias outputs: count those buffers once.
        hbm["total"] = (hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"]
                        + hbm["code"])
        report["hbm_bytes_per_chip"] = hbm
    total = report["hbm_bytes_per_chip"]["total"]
    report["fits"] = capacity is None or total <= capacity
    report["headroom"] = None if capacity is None else 1.0 - total / capacity
    report["model_flops_per_chip"] = model_flops / chips
    if compiled is None:
        return report
    report.update(estimate(compiled, images=images / chips, steps=steps,
                           model_flops=model_flops / chips, peak_tflops=peak_tflops))
    return report


def estimate(compiled, *, images: float, steps: int, model_flops: float,
             peak_tflops: float | None) -> dict[str, Any]:
    """The report's XLA counts and cost-model fields for one chip's compiled program, which
    handles `images` images per chip in `steps` steps per call and does `model_flops` of
    the model's FLOPs per chip."""
    cost = hlo_cost.cost_analysis(compiled)
    text = compiled.as_text()
    r: dict[str, Any] = {"xla_flops_per_chip": float(cost.get("flops", 0.0)),
                         "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0))}
    # The cost model's time covers each loop body once (scanned stages, gradient
    # accumulation, the sampling loop): scaled by the backend's per-op cycle estimates with
    # the loops' trip counts, it covers the whole call.
    once = hlo_cost.cost_model_seconds(cost.get("optimal_seconds"), text)
    scale = hlo_cost.loop_scale(text)
    r["cost_model_seconds_loop_bodies_once"] = once
    r["loop_scale"] = scale
    # A Pallas kernel that declares no cost counts as zero time: then no step time at all.
    r["custom_kernels"] = hlo_cost.custom_kernels(text)
    r["estimate_covers_step"] = (once is not None and scale is not None
                                 and not r["custom_kernels"]["undeclared"])
    whole = once * scale / steps if r["estimate_covers_step"] else None
    r["estimated_step_seconds"] = whole
    r["estimated_images_per_second_per_chip"] = images / (whole * steps) if whole else None
    r["estimated_mfu"] = (model_flops / (whole * peak_tflops * 1e12)
                          if whole and peak_tflops else None)
    r["cost_profile"] = hlo_cost.cost_profile(text)
    r["cost_by_kind"] = hlo_cost.cost_by_kind(text)
    r["collectives"] = hlo_cost.collectives(text)
    return r


def estimate_lines(r: dict[str, Any]) -> list[str]:
    """The report's lines for `estimate`'s fields (r["what"]: "train" or "sample")."""
    lines = [f"  XLA FLOPs      {r['xla_flops_per_chip']:.3e} per chip per step "
             f"({r['xla_bytes_accessed_per_chip']:.3e} bytes accessed)"]
    once, scale = r["cost_model_seconds_loop_bodies_once"], r["loop_scale"]
    kernels = r["custom_kernels"]
    if r["estimated_step_seconds"]:
        per = "per step" if r["what"] == "train" else "per denoising step"
        lines.append(f"  cost model     {1e3 * r['estimated_step_seconds']:.2f} ms {per}, "
                     f"{r['estimated_images_per_second_per_chip']:.1f} img/s per chip"
                     + (f", MFU {100 * r['estimated_mfu']:.1f}%" if r["estimated_mfu"] else "")
                     + ("" if scale == 1 else f" (loop bodies times their trip counts: "
                        f"{scale:.2f} x the {1e3 * once:.2f} ms XLA counts)"))
    elif kernels["undeclared"]:
        lines.append("  cost model     " + (f"{1e3 * once:.2f} ms for what XLA compiled; " if once
                                            else "")
                     + f"{kernels['undeclared']} Pallas kernel(s) declare no cost estimate "
                     "(pallas_call's cost_estimate) and XLA prices them at zero, so no step "
                     "time, img/s or MFU")
    elif once:
        lines.append(f"  cost model     {1e3 * once:.2f} ms with each loop body once; a loop's "
                     "trip count could not be read, so no step time, img/s or MFU")
    else:
        lines.append("  cost model     no estimate for this program")
    if kernels["count"] > kernels["undeclared"]:
        lines.append(f"  custom kernels {kernels['count'] - kernels['undeclared']} Pallas "
                     "kernel(s) in the estimate at the cost each declares (pallas_call's "
                     "cost_estimate), which XLA takes as given")
    for c in r["collectives"]:
        lines.append(f"  collective     {c['kind']}: {c['count']} x, {c['bytes'] / 2**20:.1f} MiB")
    for i, k in enumerate(r.get("cost_by_kind", [])):
        # MFU / the matmuls' share: the MFU if everything but the matmuls took no time.
        ceiling = ""
        if k["kind"] == hlo_cost.MATMUL and r.get("estimated_mfu"):
            ceiling = (f" (the model's FLOPs in that time: "
                       f"{100 * r['estimated_mfu'] / k['share']:.0f}% of peak)")
        lines.append(("  by kind" if i == 0 else "").ljust(17)
                     + f"{100 * k['share']:5.1f}%  {k['kind']}{ceiling}")
    for i, p in enumerate(r.get("cost_profile", [])[:8]):
        lines.append(("  where it goes" if i == 0 else "").ljust(17)
                     + f"{100 * p['share']:5.1f}%  {p['op']}")
    return lines


def _slices(r: dict[str, Any]) -> str:
    return f"{r['num_slices']} slices of " if r.get("num_slices", 1) > 1 else ""


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table of a report."""
    hbm = r["hbm_bytes_per_chip"]
    lines = [
        f"{r['what']} step of {r['model']} ({r['dtype']}{', remat' if r['remat'] else ''}) "
        f"on {_slices(r)}{r['topology']} ({r['libtpu_topology']}, "
        f"{r['chips']} x {r['device_kind']})",
        f"  mesh {r['mesh']} rules {r['mesh_rules']}"
        f"{', update split over the data axes' if r.get('shard_update') else ''}; "
        f"global batch {r['global_batch']} "
        f"({r['global_batch'] / r['chips']:g} per chip)",
        "  HBM per chip   " + ", ".join(f"{k} {memory_fit.gib(v)}" for k, v in hbm.items())
        + f" of {memory_fit.gib(r['hbm_capacity_bytes'])}: "
        + (("fits" if r["fits"] else "DOES NOT FIT")
           + ("" if r["headroom"] is None else f", headroom {100 * r['headroom']:.1f}%")),
        f"  compile        {r['compile_seconds']:.1f} s (lowering {r['lowering_seconds']:.1f} s, "
        f"{r['compile_cpu_seconds']:.1f} CPU-s{_cores(r)}; "
        f"{_allocator_note(r.get('host_allocator'))})",
        "  compiler       " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)
        + "".join(f"; {k}={' '.join(v)}" for k, v in r["compiler_flags"].items()),
        f"  model FLOPs    {r['model_flops_per_chip']:.3e} per chip per step",
    ]
    if "xla_flops_per_chip" in r:
        lines += estimate_lines(r)
    if r.get("executable"):
        lines.append(f"  executable     {r['executable']} (a training run with this --workdir "
                     "on this topology loads it instead of compiling)")
    return "\n".join(lines)


def _cores(r: dict[str, Any]) -> str:
    n = r.get("host_cpu_cores")   # absent from reports written before the field
    return f" on {n} core{'s' if n != 1 else ''}" if n else ""


def _allocator_note(allocator: str | None) -> str:
    if allocator == "glibc":   # the one a user can do something about
        return "glibc malloc; with jemalloc preloaded it compiles faster, see the README"
    return f"{allocator or 'unknown'} malloc"


def does_not_fit_message(r: dict[str, Any]) -> str:
    return memory_fit.does_not_fit(
        f"{r['model']} {r['what']} step on {r['topology']}", r["device_kind"],
        r["hbm_bytes_per_chip"]["total"], r["hbm_capacity_bytes"],
        at_least="compile_error" in r,   # the compiler stopped early
        global_batch=r["global_batch"], per_device=r["global_batch"] / r["chips"],
        mesh=r["mesh"], unit="chip", train=r["what"] == "train", remat=r["remat"],
        remat_keeps=r.get("remat_keeps"), shard_update=r.get("shard_update"))


def report_path(workdir, config) -> epath.Path:
    c = config.compile
    name = c.topology + (f"x{c.num_slices}" if c.num_slices > 1 else "")
    name += "" if c.what == "train" else f".{c.what}"
    return epath.Path(workdir) / "compile" / f"{name}.json"


def compile_from_config(config, workdir: str) -> dict[str, Any]:
    """`--mode=compile`: prints the report, writes DIR/compile/<topology>.json; raises
    DoesNotFitError (after writing) when the program needs more HBM than a chip has."""
    path = report_path(workdir, config)
    report = compile_report(config, path.with_suffix(executables.SUFFIX)
                            if config.compile.save_executable else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)
    print(f"  report         {path}", flush=True)
    if not report["fits"]:
        raise memory_fit.DoesNotFitError(does_not_fit_message(report))
    return report
