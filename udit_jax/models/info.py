"""Parameter initialisation helpers and model statistics (parameters, MACs).

Models (DiT, UDiT) provide:
  validate()              raise ValueError on an impossible configuration
  example_inputs(batch)   (x, t, y) arrays of the right shapes for init
  count_macs()            forward multiply-accumulates for one example, counted as the
                          papers count "GFLOPs" (torchprofile's rules on the official graph)
  fixed_param_count()     official state_dict entries that are not Flax params (DiT pos_embed)
  inference_form()        the model as run for sampling (U-DiT: fused FFN; DiT: itself)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import flax.linen as nn


def init_params(model, key: jax.Array, batch: int = 1) -> dict:
    """Freshly initialised float32 params (unboxed) for `model`.

    Compiled as one program: op-by-op initialisation of a model with hundreds of params is
    much slower (each random draw would be compiled on its own).
    """
    inputs = model.example_inputs(batch)
    return jax.jit(lambda k: nn.unbox(model.init(k, *inputs)["params"]))(key)


def abstract_params(model, batch: int = 1) -> dict:
    """Params as jax.ShapeDtypeStruct (no memory), still boxed with logical axis names."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs(batch)))["params"]


def logical_axes(model) -> Any:
    """A tree like the params whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_params(model))


def count_params(model) -> int:
    leaves = jax.tree_util.tree_leaves(nn.unbox(abstract_params(model)))
    return sum(math.prod(x.shape) for x in leaves) + model.fixed_param_count()


def model_info(model_or_name, **overrides) -> dict[str, float | int]:
    """Parameter counts and forward GMACs (batch 1) in training and inference (fused) form.

    model_or_name: a model or a name for `build_model` (overrides such as input_size=64 go to it).
    Returns {"params", "params_fused", "gmacs", "gmacs_fused"}; params include the frozen
    DiT pos_embed as the official counts do.
    """
    if isinstance(model_or_name, str):
        from udit_jax.models.registry import build_model
        model = build_model(model_or_name, **overrides)
    else:
        model = model_or_name.clone(**overrides) if overrides else model_or_name
    fused = model.inference_form()
    return {
        "params": count_params(model),
        "params_fused": count_params(fused),
        "gmacs": model.count_macs() / 1e9,
        "gmacs_fused": fused.count_macs() / 1e9,
    }
