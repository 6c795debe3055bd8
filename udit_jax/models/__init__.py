"""Flax (linen) models: DiT, U-DiT and the SD VAE.

    model = models.build_model("U-DiT-B")
    model = models.build_model("DiT", input_size=16, patch_size=2, hidden_size=64, depth=2, ...)
    info = models.model_info("U-DiT-B")
    vae = models.build_vae()
"""

from udit_jax.models.registry import (DIT_CONFIGS, UDIT_CONFIGS, build_model, model_family,
                                      model_names)
from udit_jax.models.info import model_info, init_params, logical_axes
from udit_jax.models.layers import forms_for

__all__ = ["DIT_CONFIGS", "UDIT_CONFIGS", "build_model", "model_family", "model_names",
           "model_info", "init_params", "logical_axes", "build_vae", "forms_for"]


def build_vae(**overrides):
    """The Stable Diffusion AutoencoderKL (diffusers argument names override the SD config)."""
    from udit_jax.models.vae import build_vae as _build
    return _build(**overrides)
