"""Gaussian diffusion of DiT / U-DiT: training objective, DDPM / DDIM / DPM-Solver++ samplers.

    d = diffusion.create_diffusion("250")      # official arguments and defaults
    terms = d.training_losses(model_fn, x0, t, noise=eps, model_kwargs={"y": y})
    x = d.p_sample_loop(model_fn, (B, H, W, C), key=key, clip_denoised=False, model_kwargs={"y": y})

Arrays are NHWC; `model_fn(x, t, **model_kwargs)` gets the original timesteps.
"""

from __future__ import annotations

from typing import Sequence

from udit_jax.diffusion.gaussian import (BETA_SCHEDULES, TABLE_NAMES, GaussianDiffusion, LossType,
                                         ModelMeanType, ModelVarType, named_beta_schedule)
from udit_jax.diffusion.respace import respace_betas, space_timesteps

__all__ = ["create_diffusion", "GaussianDiffusion", "ModelMeanType", "ModelVarType", "LossType",
           "named_beta_schedule", "space_timesteps", "respace_betas", "BETA_SCHEDULES", "TABLE_NAMES"]


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "",
                     noise_schedule: str = "linear", use_kl: bool = False, sigma_small: bool = False,
                     predict_xstart: bool = False, learn_sigma: bool = True,
                     rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The diffusion the official `create_diffusion` builds, argument for argument.

    timestep_respacing: "" / None (all diffusion_steps), "250", "10,15,20", "ddim50", or a
      list of per-section counts; the model is still called with the original timesteps.
    noise_schedule: "linear" or "squaredcos_cap_v2".
    use_kl: train on the rescaled variational bound instead of MSE.
    sigma_small / learn_sigma: fixed small or large variance, or (default) learned-range.
    predict_xstart: the model predicts x_0 instead of eps.
    rescale_learned_sigmas: rescaled MSE (the vb term times diffusion_steps / 1000).
    Defaults give eps prediction, learned-range variance and MSE + vb: DiT's and U-DiT's setup.
    """
    if not isinstance(diffusion_steps, int) or diffusion_steps < 2:
        raise ValueError(f"diffusion_steps must be an integer >= 2, got {diffusion_steps!r}")
    base_betas = named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    if len(kept) < 2:
        raise ValueError(f"timestep respacing {timestep_respacing!r} keeps {len(kept)} step(s); "
                         "a sampler needs at least 2")
    betas, timestep_map = respace_betas(base_betas, kept)
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return GaussianDiffusion(
        betas, timestep_map,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type, loss_type=loss_type, original_num_steps=diffusion_steps)
