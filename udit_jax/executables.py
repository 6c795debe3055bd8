"""Compiled programs saved to disk and loaded instead of compiling: fast start-up on a pod.

    executables.save(path, lowered, compiled)            # --mode=compile ... save_executable
    compiled, why_not = executables.load_matching(folder, lowered)   # the training run

A saved executable is the serialized XLA program (jax.experimental.serialize_executable) with
a JSON description beside it (<path>.json): the sha256 of the lowered program's text (its
StableHLO, shardings and donation included, so any change to the model, the optimizer, the
batch, the mesh or the config values baked into the step changes it), the device kind and
count, the jax / jaxlib / libtpu versions that compiled it and the compiler flags it was
compiled with (`compiler_flags`: LIBTPU_INIT_ARGS and XLA_FLAGS). A run loads one only when
all of these equal its own; otherwise it compiles and says why (a missing, stale or unreadable
file only costs the compile it was meant to save). The config that made the program is kept
too, so a stale file names the fields that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from importlib import metadata
from typing import Any

import jax
from etils import epath

from udit_jax import checkpoints

SUFFIX = ".executable"


# Environment variables holding compiler flags: libtpu's (the TPU compiler's) and XLA's.
FLAG_VARIABLES = ("LIBTPU_INIT_ARGS", "XLA_FLAGS")
# Flags that leave a compiled program as it is: dumps, and the CPU host's device count
# (the devices are compared on their own).
_INERT_FLAGS = ("--xla_dump", "--xla_force_host_platform_device_count")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The installed jax, jaxlib and libtpu versions (None where not installed)."""
    return {p: _version(p) for p in ("jax", "jaxlib", "libtpu")}


def compiler_flags() -> dict[str, list[str]]:
    """The compiler flags in this process's environment that can change a compiled program:
    {variable: its flags} for the FLAG_VARIABLES that hold any (dump and host device-count
    flags left out), each flag once with its last value (as the compilers read them), sorted:
    the same settings written twice or in another order are the same flags. Read when a
    program is compiled or loaded, so a flag set for one run is part of what that run
    compiles."""
    flags = {}
    for variable in FLAG_VARIABLES:
        last = {f.split("=", 1)[0]: f for f in os.environ.get(variable, "").split()
                if not f.startswith(_INERT_FLAGS)}
        if last:
            flags[variable] = sorted(last.values())
    return flags


def program_sha256(lowered) -> str:
    """sha256 of a jax Lowered program's text (StableHLO with shardings and donation)."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Description:
    program_sha256: str
    device_kind: str
    num_devices: int
    versions: dict[str, str | None]
    config: dict | None = None      # the resolved config (JSON), when one made the program
    # compiler_flags() when compiled; None in descriptions written before they were recorded.
    compiler_flags: dict[str, list[str]] | None = None

    @classmethod
    def of(cls, lowered, devices, config=None) -> "Description":
        devices = list(devices)
        return cls(program_sha256(lowered), devices[0].device_kind, len(devices), versions(),
                   None if config is None else checkpoints.config_as_json(config),
                   compiler_flags())

    def differences(self, other: "Description") -> list[str]:
        """What differs, in words (empty when `other` can run here)."""
        out = []
        if self.program_sha256 != other.program_sha256:
            fields = []
            if self.config is not None and other.config is not None:
                a = checkpoints.flatten_config(other.config)
                b = checkpoints.flatten_config(self.config)
                fields = [f"{k}: {a.get(k, 'absent')} there, {b.get(k, 'absent')} now"
                          for k in sorted(a.keys() | b.keys())
                          if a.get(k, "absent") != b.get(k, "absent")]
            out.append("the program differs" + (f" ({', '.join(fields[:5])}"
                                                 + (", ...)" if len(fields) > 5 else ")")
                                                 if fields else ""))
        if (self.device_kind, self.num_devices) != (other.device_kind, other.num_devices):
            out.append(f"compiled for {other.num_devices} x {other.device_kind}, this run has "
                       f"{self.num_devices} x {self.device_kind}")
        for package, version in self.versions.items():
            if other.versions.get(package) != version:
                out.append(f"compiled with {package} {other.versions.get(package)}, this run "
                           f"has {version}")
        if other.compiler_flags is None:
            out.append("its compiler flags were not recorded (an earlier release saved it)")
        else:
            for variable in FLAG_VARIABLES:
                there = other.compiler_flags.get(variable)
                here = (self.compiler_flags or {}).get(variable)
                if there != here:
                    out.append(f"compiled with {variable}={_flags_text(there)}, this run has "
                               f"{_flags_text(here)}")
        return out


def _flags_text(flags: list[str] | None) -> str:
    return repr(" ".join(flags)) if flags else "(none)"


def save(path, lowered, compiled, devices, config=None) -> epath.Path:
    """Writes `compiled` (of `lowered`, for `devices`, made from `config`) to path and its
    description to path.json, each through a temporary name (a reader never sees half a
    file)."""
    from jax.experimental import serialize_executable
    path = epath.Path(path)
    payload, _, _ = serialize_executable.serialize(compiled)
    description = Description.of(lowered, devices, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, payload),
                         (epath.Path(f"{path}.json"),
                          json.dumps(dataclasses.asdict(description), indent=2).encode())):
        tmp = epath.Path(f"{target}.tmp")
        tmp.write_bytes(data)
        tmp.rename(target)
    return path


def _read_description(path: epath.Path) -> Description:
    return Description(**json.loads(epath.Path(f"{path}.json").read_text()))


def saved_in(folder) -> list[epath.Path]:
    """The saved executables in `folder` (none when it does not exist)."""
    folder = epath.Path(folder)
    return sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def load_matching(folder, lowered, devices=None, config=None) -> tuple[Any, str]:
    """(the compiled program from a saved executable in `folder` made from the same program for
    the same devices and versions, its path) or (None, why none was used). `config`: this
    run's, to name the fields that changed when a program differs."""
    candidates = saved_in(folder)
    if not candidates:
        return None, f"no *{SUFFIX} in {folder}"
    here = Description.of(lowered, jax.devices() if devices is None else devices, config)
    reasons = []
    for path in candidates:
        try:
            differences = here.differences(_read_description(path))
        except (OSError, ValueError, TypeError) as e:
            reasons.append(f"{path.name}: unreadable description ({e})")
            continue
        if differences:
            reasons.append(f"{path.name}: " + "; ".join(differences))
            continue
        from jax.experimental import serialize_executable
        try:
            compiled = serialize_executable.deserialize_and_load(
                path.read_bytes(), lowered.in_tree, lowered.out_tree)
        except (jax.errors.JaxRuntimeError, pickle.UnpicklingError, EOFError, ValueError,
                TypeError) as e:   # a truncated or foreign payload: compile instead
            reasons.append(f"{path.name}: could not be loaded ({type(e).__name__}: {e})")
            continue
        return compiled, str(path)
    return None, " | ".join(reasons)
