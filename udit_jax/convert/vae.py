"""SD AutoencoderKL weights: diffusers / original-LDM state_dicts <-> Flax params.

Three namings of the same weights are in circulation; all are accepted:
  * current diffusers: `...mid_block.attentions.0.to_q/to_k/to_v/to_out.0` (Linear [C, C]);
  * older diffusers files (the `stabilityai/sd-vae-ft-ema` / `-ft-mse` .bin): the same, but the
    attention is `query/key/value/proj_attn`;
  * the original LDM / CompVis checkpoints (`vae-ft-mse-840000-ema-pruned.ckpt`, and the
    `first_stage_model.` part of full SD checkpoints): `encoder.down.0.block.0...`,
    `mid.attn_1.q/k/v/proj_out` as 1x1 convs [C, C, 1, 1], decoder `up` levels numbered in
    reverse.
They are first renamed to the current diffusers names (`diffusers_state_dict`), which map
one-to-one onto the Flax params (module names mirror them, 'down_blocks_0' <-> 'down_blocks.0').
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from udit_jax.convert.common import (CONV, LINEAR, SAME, ConversionError, KeySpec, abstract_param_shapes,
                                     build_specs, params_from_state_dict, state_dict_from_params)
from udit_jax.convert.io import load_state_dict

# Prefixes under which whole-pipeline checkpoints keep the VAE.
_VAE_PREFIXES = ("first_stage_model.", "vae.")
# Attention key in the older diffusers naming -> current name.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _flax_part_to_torch(part: str) -> str:
    return re.sub(r"_(\d+)$", r".\1", part)  # 'down_blocks_0' -> 'down_blocks.0', 'to_out_0' -> 'to_out.0'


def _describe(path: tuple[str, ...], shape: tuple[int, ...]):
    module = ".".join(_flax_part_to_torch(p) for p in path[:-1])
    leaf = path[-1]
    if leaf == "kernel":
        return f"{module}.weight", CONV if len(shape) == 4 else LINEAR, None
    if leaf == "scale":
        return f"{module}.weight", SAME, None
    return f"{module}.{leaf}", SAME, None


def vae_torch_key_specs(vae) -> list[KeySpec]:
    """One KeySpec (diffusers key <-> Flax path, layout, shapes) per VAE parameter."""
    return build_specs(abstract_param_shapes(vae, *vae.example_inputs(1)), _describe)


def _describe_vae(vae) -> str:
    return (f"AutoencoderKL(block_out_channels={tuple(vae.block_out_channels)}, "
            f"layers_per_block={vae.layers_per_block}, norm_num_groups={vae.norm_num_groups}, "
            f"latent_channels={vae.latent_channels}, in/out_channels={vae.in_channels}/{vae.out_channels}, "
            f"mid_block_add_attention={vae.mid_block_add_attention}, use_quant_conv={vae.use_quant_conv}, "
            f"use_post_quant_conv={vae.use_post_quant_conv}) (keys shown in diffusers naming)")


def _ldm_key_to_diffusers(key: str, num_levels: int) -> str:
    """Renames one original-LDM key (`encoder.down.0.block.1.nin_shortcut.weight`, ...)."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    # LDM builds decoder levels from the highest resolution up; diffusers from the lowest.
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.", key)
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                 lambda m: f".mid_block.attentions.0.{_LDM_ATTENTION_NAMES[m[1]]}.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def diffusers_state_dict(state_dict: Mapping[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """Any accepted naming -> current diffusers names, attention weights as Linear [C, C].

    num_levels: len(block_out_channels), needed to renumber the LDM decoder levels.
    Keys that match no known pattern are passed through (the shape check then reports them).
    """
    for prefix in _VAE_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    renamed: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for key, value in state_dict.items():
        new = _ldm_key_to_diffusers(key, num_levels)
        new = re.sub(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.",
                     lambda m: f".attentions.{m[1]}.{_OLD_ATTENTION_NAMES[m[2]]}.", new)
        value = np.asarray(value)
        if _ATTENTION_WEIGHT.search(new) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a 1x1 conv on [B, C, H, W] is a Linear on the channels
        if new in renamed:
            raise ConversionError(f"state_dict holds two weights for {new}: {sources[new]!r} and {key!r}; "
                                  "it mixes attention naming schemes, keep one of them")
        renamed[new], sources[new] = value, key
    return renamed


def vae_params_from_torch(vae, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax params (the 'params' collection, numpy float32) for `vae` from a PyTorch state_dict.

    Accepts diffusers, older-diffusers and original-LDM names (see the module docstring).
    Raises ConversionError listing every missing, unexpected or wrongly shaped key.
    """
    state_dict = diffusers_state_dict(state_dict, len(vae.block_out_channels))
    params = params_from_state_dict(vae_torch_key_specs(vae), state_dict, _describe_vae(vae))
    return _float32(params)


def _float32(tree):
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def vae_params_to_torch(vae, params) -> dict[str, np.ndarray]:
    """The diffusers state_dict (current names, PyTorch layouts, numpy) of Flax VAE params."""
    return state_dict_from_params(vae_torch_key_specs(vae), params)


def load_vae_params(vae, path: str | os.PathLike) -> dict:
    """`vae_params_from_torch` on a weights file (.safetensors / .npz, or .bin / .pt / .ckpt with torch)."""
    return vae_params_from_torch(vae, load_state_dict(path, prefer="state_dict"))
