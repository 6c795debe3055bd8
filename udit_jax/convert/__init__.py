"""Weights to and from the official PyTorch checkpoints.

    params = convert.params_from_torch(model, state_dict)     # DiT or U-DiT
    state_dict = convert.params_to_torch(model, params)
    params = convert.vae_params_from_torch(vae, state_dict)   # SD AutoencoderKL
    state_dict = convert.load_state_dict(path)                # .npz / .safetensors / .pt / .bin

State dicts are `dict[str, np.ndarray]` with the official key names and PyTorch layouts.
"""

from udit_jax.convert.common import ConversionError
from udit_jax.convert.io import load_state_dict, save_state_dict
from udit_jax.convert.models import params_from_torch, params_to_torch, torch_key_specs

__all__ = [
    "ConversionError",
    "load_state_dict",
    "save_state_dict",
    "params_from_torch",
    "params_to_torch",
    "torch_key_specs",
    "vae_params_from_torch",
    "vae_params_to_torch",
    "load_vae_params",
]


def vae_params_from_torch(vae, state_dict):
    """SD AutoencoderKL params from a diffusers or original-LDM state_dict (see convert/vae.py)."""
    from udit_jax.convert.vae import vae_params_from_torch as _impl
    return _impl(vae, state_dict)


def vae_params_to_torch(vae, params):
    """The diffusers-named state_dict of SD AutoencoderKL params."""
    from udit_jax.convert.vae import vae_params_to_torch as _impl
    return _impl(vae, params)


def load_vae_params(vae, path):
    """VAE params from a checkpoint file (.safetensors / .npz / .bin / .pt)."""
    from udit_jax.convert.vae import load_vae_params as _impl
    return _impl(vae, path)
