"""The mesh is config data: axis names and sizes from config.mesh, rules checked against them."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from udit_jax import config as config_lib
from udit_jax import parallel


def test_default_mesh_is_data_and_fsdp():
    mesh = config_lib.make_mesh(config_lib.base_config())
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    assert parallel.batch_sharding(mesh, 4).spec == P(("data", "fsdp"), None, None, None)


def test_a_third_axis_is_a_config_change():
    config = config_lib.base_config()
    config.mesh.axes = ("data", "fsdp", "tensor")
    config.mesh.tensor = 1
    config.mesh.rules = [("mlp", "tensor"), ("embed", "fsdp")]
    mesh = config_lib.make_mesh(config)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    # The batch is split over the data-parallel axes only; 'tensor' sees all of it.
    assert parallel.batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)
    assert parallel.batch_ways(mesh) == jax.device_count()
    assert parallel.resolve_rules(config.mesh.rules, mesh.axis_names)[0] == ("mlp", "tensor")
    config_lib.validate(config)


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.axes": ("data", "fsdp", "tensor")}, "mesh.axes names \\['tensor'\\] without a size"),
    ({"mesh.fsdp": 3}, "does not divide"),
    ({"mesh.data": 2, "mesh.fsdp": -1} if jax.device_count() == 1 else {"mesh.data": 0},
     "does not divide|positive"),
    ({"mesh.rules": [("mlp", "tensor")]}, "unknown mesh axis 'tensor'"),
])
def test_bad_meshes_fail_with_the_field_to_fix(overrides, message):
    config = config_lib.base_config()
    config.sample_every_steps = 0
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


@pytest.mark.parametrize("spec, shape, want", [
    (P(), (64, 128), P(("data", "fsdp"), None)),           # replicated: split on its first dim
    (P(None, "fsdp"), (64, 128), P("data", "fsdp")),        # FSDP-sharded: 'data' is added
    (P(), (5, 64, 128), P(None, ("data", "fsdp"), None)),   # a scan's stacked depth is skipped
    (P(), (6, 4), P()),                                     # nothing divisible: left whole
    (P(), (3,), P()),
])
def test_split_update_adds_the_data_axes_a_parameter_leaves_free(spec, shape, want):
    """mesh.shard_update: each optimizer-state / EMA leaf is split over the data-parallel axes
    its parameter does not use (ZeRO-1), on the first dimension they divide."""
    from jax.sharding import AbstractMesh, NamedSharding
    mesh = AbstractMesh((4, 2), ("data", "fsdp"))
    assert parallel.update_sharding(NamedSharding(mesh, spec), shape).spec == want
