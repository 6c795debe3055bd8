"""cpu_host: XLA:CPU steps reuse their buffers instead of faulting them in at every call.

Each case runs a program whose intermediate (a [rows, 2048] float32 product between two
matmuls) XLA:CPU allocates afresh at every call, and counts the process's minor page faults
per call (getrusage) after two warm-up calls. glibc without the settings maps and unmaps the
intermediate each call: one fault per 4 KiB page of it.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = 4096

_PROBE = r"""
import json, resource, sys
settings, devices, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def probe(config, workdir):
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((devices,), ("d",), axis_types=(AxisType.Auto,))
    shard = NamedSharding(mesh, P("d"))
    x = jax.device_put(jnp.ones((rows * devices, 8), jnp.float32), shard)
    w, w2 = jnp.ones((8, 2048), jnp.float32), jnp.ones((2048, 8), jnp.float32)
    step = jax.jit(lambda x: (jnp.tanh(x @ w) @ w2).sum(axis=1), out_shardings=shard)
    for _ in range(2):
        jax.block_until_ready(step(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        jax.block_until_ready(step(x))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    print(json.dumps({"faults_per_call": faults, "devices": jax.device_count()}))

if settings == "main":   # as main.py runs every job
    from absl import flags
    from udit_jax import config as config_lib, main
    flags.FLAGS(["probe", "--config=configs/demo.py", "--workdir=" + sys.argv[4]])   # main's flags
    main._MODES["probe"] = ("__main__", "probe")
    config = config_lib.base_config()
    config.mesh.cpu_devices = devices
    config.compile.cache = False
    main.run_mode("probe", config, sys.argv[4])
else:                     # glibc and JAX as they come
    import jax
    jax.config.update("jax_num_cpu_devices", devices)
    probe(None, None)
"""


def _faults_per_call(settings: str, devices: int, mib_per_device: int, tmp_path) -> float:
    rows = mib_per_device * 2**20 // (2048 * 4)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _PROBE, settings, str(devices), str(rows),
                           str(tmp_path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == devices
    return out["faults_per_call"]


def _glibc() -> bool:
    from udit_jax import cpu_host
    return cpu_host._glibc() is not None


pytestmark = pytest.mark.skipif(sys.platform != "linux" or not _glibc(),
                                reason="glibc's malloc on Linux is what the settings tune")


@pytest.mark.parametrize("devices, mib", [
    (1, 96),   # over glibc's 64 MiB per-thread heap: needs the one-device program inline
    (2, 40),   # each device's worker thread: needs the kept memory
])
def test_main_runs_cpu_steps_without_refaulting_their_buffers(devices, mib, tmp_path):
    pages = mib * 2**20 / PAGE
    assert _faults_per_call("glibc", devices, mib, tmp_path) > 0.5 * devices * pages
    assert _faults_per_call("main", devices, mib, tmp_path) < 0.01 * devices * pages
