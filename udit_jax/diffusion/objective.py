"""The training objective a config selects: DDPM's eps objective or SiT's transport, with
timestep sampling and min-SNR-gamma weighting, behind one interface for the train step:

    t = objective.sample_t(key, (B,))                   # the objective's time draw
    terms = objective.training_losses(model_fn, x, t, noise=eps, model_kwargs={"y": y})
    terms["loss"]                                       # [B], weighted; plus its parts

x is the data [B, H, W, C] (DDPM's x_0, SiT's x1), noise ~ N(0, I) like x.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from udit_jax.diffusion import transport as transport_lib
from udit_jax.diffusion.gaussian import GaussianDiffusion, ModelMeanType
from udit_jax.diffusion.timesteps import TimestepSampling
from udit_jax.diffusion.weighting import min_snr_weight

OBJECTIVES = ("ddpm", "transport")


@dataclasses.dataclass(frozen=True)
class DDPMObjective:
    """DiT's objective (mse + vb with a learned variance); min-SNR weights the mse term."""
    diffusion: GaussianDiffusion
    timesteps: TimestepSampling = TimestepSampling()
    min_snr_gamma: float | None = None

    def sample_t(self, key: jax.Array, shape) -> jax.Array:
        """Step indices [shape] int32 in [0, num_timesteps)."""
        return self.timesteps.ddpm_steps(key, shape, self.diffusion.num_timesteps)

    def training_losses(self, model_fn, x, t, *, noise, model_kwargs=None) -> dict:
        terms = self.diffusion.training_losses(model_fn, x, t, noise=noise,
                                               model_kwargs=model_kwargs)
        if self.min_snr_gamma is None:
            return terms
        if "mse" not in terms:
            raise ValueError("min-SNR weighting needs an MSE loss (not the KL bound)")
        abar = jnp.asarray(self.diffusion.alphas_cumprod, jnp.float32)[t]
        target = "x0" if self.diffusion.model_mean_type == ModelMeanType.START_X else "eps"
        weight = min_snr_weight(jnp.sqrt(abar), jnp.sqrt(1 - abar), self.min_snr_gamma, target)
        terms["loss"] = weight * terms["mse"] + terms.get("vb", 0.0)
        return terms


@dataclasses.dataclass(frozen=True)
class TransportObjective:
    """SiT's training_losses; min-SNR (with loss_weight None) reweights its per-example loss."""
    transport: transport_lib.Transport
    timesteps: TimestepSampling = TimestepSampling()
    min_snr_gamma: float | None = None

    def __post_init__(self):
        if self.min_snr_gamma is not None and self.transport.loss_weight is not None:
            raise ValueError(f"min-SNR weighting replaces SiT's loss_weight, which is "
                             f"{self.transport.loss_weight!r}; use one of them")

    def sample_t(self, key: jax.Array, shape) -> jax.Array:
        """SiT's unit draws u [shape] float32 (t = u (t1 - t0) + t0; 1 = data)."""
        return self.timesteps.data_level(key, shape)

    def training_losses(self, model_fn, x, t, *, noise, model_kwargs=None) -> dict:
        terms = self.transport.training_losses(model_fn, x, model_kwargs, u=t, noise=noise)
        terms = {"loss": terms["loss"], "t": terms["t"]}
        if self.min_snr_gamma is not None:
            terms["loss"] = terms["loss"] * self.min_snr_weight(terms["t"])
        return terms

    def min_snr_weight(self, t):
        """Weights [B] at SiT times t [B] for this transport's loss (see weighting.py)."""
        path = self.transport.path_sampler
        alpha, d_alpha = path.compute_alpha_t(t)
        sigma, d_sigma = path.compute_sigma_t(t)
        if self.transport.prediction == "velocity":
            return min_snr_weight(alpha, sigma, self.min_snr_gamma, "velocity", d_alpha, d_sigma)
        # SiT's noise and score losses are both eps-space MSEs.
        return min_snr_weight(alpha, sigma, self.min_snr_gamma, "eps")
