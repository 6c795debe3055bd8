"""SiT's flow matching / stochastic interpolants (`transport`), in JAX, NHWC.

    tr = transport.create_transport("Linear", "velocity")     # SiT's names and defaults
    terms = tr.training_losses(model_fn, x1, {"y": y}, key=key)   # terms["loss"]: [B]
    sampler = transport.Sampler(tr)
    traj = sampler.sample_ode(sampling_method="heun2", num_steps=50)(z, model_fn, y=y)
    x = transport.sample_loop(sampler.sample_sde(num_steps=250), model_fn, (B, H, W, C),
                              key=key, model_kwargs={"y": y})

Time runs from t = 0 (noise) to t = 1 (data), the reverse of DDPM's indexing; `model_fn(x, t,
**kw)` gets t in [0, 1] as a [B] float vector. Numbers follow the official code
(willisma/SiT) operation by operation; settings it crashes on or turns into NaN are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from udit_jax.diffusion import sampling
from udit_jax.diffusion.transport.integrators import (ODE_METHODS, SDE_METHODS, integrate_ode,
                                                      time_grid)
from udit_jax.diffusion.transport.path import (DIFFUSION_FORMS, PATH_TYPES, GVPPath, LinearPath,
                                               VPPath, make_path)
from udit_jax.diffusion.transport.sampler import LAST_STEPS, Sampler, SamplingFn
from udit_jax.diffusion.transport.transport import (LOSS_WEIGHTS, PREDICTIONS, Transport,
                                                    create_transport, mean_flat)

__all__ = ["create_transport", "Transport", "Sampler", "SamplingFn", "sample_loop", "time_grid",
           "integrate_ode", "make_path", "LinearPath", "GVPPath", "VPPath", "mean_flat",
           "PATH_TYPES", "PREDICTIONS", "LOSS_WEIGHTS", "ODE_METHODS", "SDE_METHODS",
           "DIFFUSION_FORMS", "LAST_STEPS"]


def sample_loop(sampling_fn: SamplingFn, model_fn, shape, *, noise=None, key=None,
                model_kwargs: dict | None = None) -> jax.Array:
    """Samples x [B, H, W, C] with a sample_ode / sample_sde function, like the diffusion loops.

    noise: the start state z [shape] (standard normal at t = 0); key draws what is not given
    (z, and the SDE's per-step noise). Only the final state is kept.
    """
    model_kwargs = model_kwargs or {}
    k_z = k_steps = None
    if key is not None:
        k_z, k_steps = jax.random.split(key)
    noise = sampling.noise_like(jax.ShapeDtypeStruct(tuple(shape), jnp.float32), noise, k_z,
                                "sample_loop (the start noise)")
    if sampling_fn.stochastic:
        if k_steps is None:
            raise ValueError("an SDE sampler draws noise at every step: pass key=")
        return sampling_fn.final(noise, model_fn, key=k_steps, **model_kwargs)
    return sampling_fn.final(noise, model_fn, **model_kwargs)
