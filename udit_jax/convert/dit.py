"""DiT weights: official `models.py` state_dicts <-> Flax params.

Official keys map to Flax paths by replacing '.' with '/', 'blocks.i' with 'blocks_i',
'mlp.0'/'mlp.2' with 'mlp_0'/'mlp_2' and 'adaLN_modulation.1' with 'adaLN_modulation';
'weight' is a Dense/Conv 'kernel' (transposed), an embedding table or a LayerNorm 'scale'.

`pos_embed` (1, T, D) is in the official state_dict but is a fixed sin-cos table, not a Flax
param: on import it must equal the table the model computes (else the checkpoint was made
for another input or patch size), and on export the computed table is written, which is
what the official code saves.

The non-adaLN-Zero block types have no official checkpoints; they use the same scheme with
official-style names: 'adaln' blocks as adaLN-Zero with adaLN_modulation.1 of shape (4D, D);
'cross_attn' blocks norm1/attn/norm2/cross_attn.{q,kv,proj}/norm3/mlp; 'in_context' blocks
norm1/attn/norm2/mlp; a non-adaptive final layer final_layer.norm_final and .linear.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from udit_jax.convert.common import (CONV, LINEAR, SAME, ConversionError, KeySpec,
                                     abstract_param_shapes, build_specs, check_state_dict,
                                     params_from_state_dict, state_dict_from_params)

POS_EMBED_KEY = "pos_embed"
POS_EMBED_ATOL = 1e-6

# Flax module names whose official name differs by more than '_<index>' -> '.<index>'.
_MODULE_NAMES = {"adaLN_modulation": "adaLN_modulation.1"}


def _module_name(name: str) -> str:
    if name in _MODULE_NAMES:
        return _MODULE_NAMES[name]
    return re.sub(r"_(\d+)$", r".\1", name)


def _describe(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, str, None]:
    """(official key, layout, None) for the Flax param at `path`."""
    *modules, leaf = path
    prefix = ".".join(_module_name(m) for m in modules)
    if leaf == "kernel":
        return f"{prefix}.weight", LINEAR if len(shape) == 2 else CONV, None
    if leaf == "embedding_table":
        return f"{prefix}.embedding_table.weight", SAME, None
    if leaf == "scale":
        return f"{prefix}.weight", SAME, None
    if leaf == "bias":
        return f"{prefix}.bias", SAME, None
    raise ValueError(f"no official name for DiT param {'/'.join(path)}")


def _describe_model(model) -> str:
    return (f"DiT(input_size={model.input_size}, patch_size={model.patch_size}, "
            f"hidden_size={model.hidden_size}, depth={model.depth}, num_heads={model.num_heads}, "
            f"in_channels={model.in_channels}, num_classes={model.num_classes}, "
            f"learn_sigma={model.learn_sigma}, block_type={model.block_type!r})")


def torch_key_specs(model) -> list[KeySpec]:
    """KeySpecs of the model's Flax params (pos_embed, a fixed table, is not among them)."""
    shapes = abstract_param_shapes(model, *model.example_inputs(1))
    return build_specs(shapes, _describe)


def pos_embed_spec(model) -> KeySpec:
    """The KeySpec of the official pos_embed entry (checked by key and shape like the others)."""
    shape = (1, model.num_patches, model.hidden_size)
    return KeySpec(POS_EMBED_KEY, (POS_EMBED_KEY,), SAME, shape, shape)


def params_from_torch(model, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax params for `model` from an official DiT state_dict (dict of numpy arrays).

    Raises ConversionError listing missing, unexpected and wrongly shaped keys, or when
    pos_embed is not the sin-cos table this model computes.
    """
    specs = torch_key_specs(model)
    desc = _describe_model(model)
    check_state_dict(specs + [pos_embed_spec(model)], state_dict, desc)
    expected = model.pos_embed_table()[None]
    err = float(np.max(np.abs(np.asarray(state_dict[POS_EMBED_KEY], np.float64) - expected)))
    if not err <= POS_EMBED_ATOL:
        raise ConversionError(
            f"pos_embed of the state_dict differs from the sin-cos table of {desc} by up to "
            f"{err:.3g}: the checkpoint was likely made for another input_size (image size / 8) "
            f"or patch size; build the model with the checkpoint's input_size and patch_size")
    return params_from_state_dict(specs, state_dict, desc, ignore=(POS_EMBED_KEY,))


def params_to_torch(model, params) -> dict[str, np.ndarray]:
    """The official DiT state_dict (numpy, PyTorch layouts) of `params`, pos_embed included."""
    state_dict = {POS_EMBED_KEY: model.pos_embed_table()[None]}
    state_dict.update(state_dict_from_params(torch_key_specs(model), params))
    return state_dict
