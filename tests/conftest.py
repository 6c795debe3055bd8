"""Shared test setup: CPU-only JAX at full float32 precision and the fixture folder."""

import os
import pathlib

import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU compiles dominate test time; a persistent cache lets repeated compiles (subprocess
# tests, re-runs) reuse executables. Environment variables so subprocesses inherit them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "udit_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# The tests' own udit_jax cache (paths.user_cache_dir), not the user's: the quality classifier
# trained here runs under the tests' XLA flags (below) and matmul precision, so its weights
# differ in the last bits from one a user's run trains, and a demo run after the tests would
# score its samples with it (test accuracy 89.6% instead of 89.4%) instead of the README's.
os.environ.setdefault("UDIT_JAX_CACHE", os.path.join(tempfile.gettempdir(), "udit_jax_test_cache"))
# Tests compile hundreds of small programs and run each a few times: LLVM's optimisations of
# XLA:CPU's kernels cost more than they save (on a 2-core VM, test_evaluation_pipeline.py with
# test_udit_scan.py: 162 s at level 0, 178 s at 1, 186 s at the default 2). HLO passes and
# sharding are unchanged, and dots and convolutions stay library calls.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS) if f)


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a test's subprocess: `flags` plus the tests' own (TEST_XLA_FLAGS)."""
    return " ".join((*flags, TEST_XLA_FLAGS))


import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("UDIT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"parity fixtures not found at {FIXTURES}; set UDIT_FIXTURES to the folder")
    return FIXTURES


def load_npz(name: str) -> dict:
    """Loads `name` from the fixture folder as a dict of numpy arrays."""
    with np.load(FIXTURES / name) as data:
        return {k: data[k] for k in data.files}


def assert_close_rel(actual, expected, rel=1e-5, what=""):
    """max|a - e| <= rel * max(1, max|e|): the fixture README's scale-relative criterion."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected)) if expected.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:g} * {scale:.3g}"


def random_params(model, seed: int = 0, std: float = 0.05) -> dict:
    """Random N(0, std) params of the model's shapes, drawn with numpy (no XLA init compile)."""
    from flax import linen as nn
    from udit_jax.models import info
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(info.abstract_params(model))
    return jax.tree_util.tree_map(lambda s: jax.numpy.asarray(rng.normal(0, std, s.shape), np.float32), shapes)
