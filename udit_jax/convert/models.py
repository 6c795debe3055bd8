"""Dispatch of DiT / U-DiT weight conversion to the model family's converter."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def _converter(model):
    from udit_jax.models.udit import UDiT
    if isinstance(model, UDiT):
        from udit_jax.convert import udit as family
    elif type(model).__name__ == "DiT":
        from udit_jax.convert import dit as family
    else:
        raise TypeError(f"no converter for {type(model).__name__}; expected a DiT or U-DiT model "
                        "(for the VAE use convert.vae_params_from_torch)")
    return family


def torch_key_specs(model):
    """The KeySpecs (official key <-> Flax path, layout, shapes) of `model`."""
    return _converter(model).torch_key_specs(model)


def params_from_torch(model, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax params for `model` from an official state_dict (official names and layouts).

    Raises ConversionError listing every missing, unexpected or wrongly shaped key.
    """
    return _converter(model).params_from_torch(model, state_dict)


def params_to_torch(model, params) -> dict[str, np.ndarray]:
    """The official state_dict (numpy arrays, PyTorch layouts) of `params`."""
    return _converter(model).params_to_torch(model, params)
