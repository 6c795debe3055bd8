"""mesh.cpu_devices: a CPU host split into XLA devices before JAX starts its backend."""

import os
import pathlib
import subprocess
import sys

import pytest

from udit_jax import parallel

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_devices_split_the_host_when_set_before_jax_starts():
    code = ("from udit_jax import parallel; parallel.set_cpu_devices(3); import jax; "
            "print(jax.device_count(), jax.devices()[0].platform)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[-2:] == ["3", "cpu"]


def test_cpu_devices_after_jax_started_say_so():
    import jax
    jax.devices()   # the backend is running in the test process
    with pytest.raises(RuntimeError, match="before JAX starts its CPU backend"):
        parallel.set_cpu_devices(jax.config.jax_num_cpu_devices + 5)
    parallel.set_cpu_devices(0)   # the default: nothing to do


def test_cpu_devices_refuse_negative_counts():
    with pytest.raises(ValueError, match="use -1 \\(one per core\\)"):
        parallel.set_cpu_devices(-2)
