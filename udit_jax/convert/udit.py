"""U-DiT: official `udit_models.U_DiT` state_dict <-> Flax params.

Flax paths mirror the official module names ("encoder_level_1_0/attn1/to_qkv" for
"encoder_level_1.0.attn1.to_qkv"); this module spells out the few renames. The fused
(inference) FFN form uses the names of the tensors that the official `add_buffer` computes
(`mlp1.project_in_weight`, `mlp1.dwconv_bias`, ...), as in the fixture file of fused FFNs.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from udit_jax.convert import common
from udit_jax.models.udit import STAGES, UDiT, stack_blocks, unstack_blocks

_MODULE_RENAMES = {
    "x_embedder": "x_embedder.proj",
    "down1_2": "down1_2.body.0",
    "down2_3": "down2_3.body.0",
    "up3_2": "up3_2.body.0",
    "up2_1": "up2_1.body.0",
    "mlp_0": "mlp.0",
    "mlp_2": "mlp.2",
    "adaLN_modulation": "adaLN_modulation.1",
    "adaLN_modulation1": "adaLN_modulation1.1",
    "adaLN_modulation2": "adaLN_modulation2.1",
    "downsampler_layer": "downsampler.layer",
    "project_in_0": "project_in.0",
    "project_in_1": "project_in.1",
    "project_out_0": "project_out.0",
    "project_out_1": "project_out.1",
    "dwconv_0": "dwconv.0",
    "dwconv_1": "dwconv.1",
    "dwconv_2": "dwconv.2",
}
_FUSED_FFN_MODULES = ("project_in", "dwconv", "project_out")


def _module_key(segment: str) -> str:
    for stage in STAGES:
        prefix = stage + "_"
        if segment.startswith(prefix) and segment[len(prefix):].isdigit():
            return f"{stage}.{segment[len(prefix):]}"
    return _MODULE_RENAMES.get(segment, segment)


def _describe(model: UDiT):
    fused_names = model.fused_ffn

    def describe(path: tuple[str, ...], shape: tuple[int, ...]):
        *modules, leaf = path
        if leaf == "logit_scale":
            key = ".".join(_module_key(m) for m in modules) + ".logit_scale"
            return key, common.RESHAPE, (shape[0], 1, 1)
        if leaf == "embedding_table":
            return ".".join(_module_key(m) for m in modules) + ".embedding_table.weight", common.SAME, None
        layout = {2: common.LINEAR, 4: common.CONV}.get(len(shape), common.SAME)
        if fused_names and modules[-1] in _FUSED_FFN_MODULES and modules[-2].startswith("mlp"):
            # Fused FFN tensors: "<block>.mlpK.project_in_weight" etc.
            key = ".".join(_module_key(m) for m in modules[:-1])
            return f"{key}.{modules[-1]}_{'weight' if leaf == 'kernel' else 'bias'}", layout, None
        torch_leaf = {"kernel": "weight", "bias": "bias"}[leaf]
        return ".".join(_module_key(m) for m in modules) + "." + torch_leaf, layout, None

    return describe


def torch_key_specs(model: UDiT) -> list[common.KeySpec]:
    """Official keys <-> params of the unrolled model (scanned params are unstacked first)."""
    model = model.clone(scan_blocks=False)
    shapes = common.abstract_param_shapes(model, *model.example_inputs(1))
    return common.build_specs(shapes, _describe(model))


def _describe_model(model: UDiT) -> str:
    return (f"U-DiT(hidden_size={model.hidden_size}, depth={tuple(model.depth)}, "
            f"num_heads={model.num_heads}, num_classes={model.num_classes}, "
            f"in_channels={model.in_channels}, ffn_type={model.ffn_type!r}, rep={model.rep}, "
            f"fused_ffn={model.fused_ffn})")


def params_from_torch(model: UDiT, state_dict: Mapping[str, np.ndarray]) -> dict:
    params = common.params_from_state_dict(torch_key_specs(model), state_dict, _describe_model(model))
    return stack_blocks(params, model.depth) if model.scan_blocks else params


def params_to_torch(model: UDiT, params) -> dict[str, np.ndarray]:
    if model.scan_blocks:
        params = unstack_blocks(params, model.depth)
    return common.state_dict_from_params(torch_key_specs(model), params)
