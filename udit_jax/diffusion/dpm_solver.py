"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), multistep, data prediction.

A deterministic sampler of the probability-flow ODE that works with the DiT / U-DiT
epsilon models (the learned variance is ignored). It walks the steps of the (respaced)
process it is called on, so the step count is chosen the usual way:
`create_diffusion("20").dpm_solver_sample_loop(...)`. With noise levels
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
each step from t to s = t - 1 with h = lambda_s - lambda_t is

    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) D,

where D is the x_0 prediction at t (first order; this is exactly DDIM with eta = 0) or, for
order 2, the extrapolation (1 + 1/2r) x0_t - (1/2r) x0_prev with r = h_prev / h
(DPM-Solver++(2M)) on every step except the first and the last two. The last step goes to
sigma = 0 and returns the x_0 prediction at t = 0, as DDIM does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from udit_jax.diffusion import sampling


def step_coefficients(alphas_cumprod: np.ndarray, order: int) -> dict[str, np.ndarray]:
    """Per-step coefficients in float64, indexed by the step t of the process.

    Returns {"x": sigma_s / sigma_t, "d": alpha_s (1 - e^-h), "cur": weight of x0_t in D,
    "prev": weight of x0 from the previous (t + 1) step in D}, each [S].
    """
    alpha = np.sqrt(alphas_cumprod)
    sigma = np.sqrt(1.0 - alphas_cumprod)
    lam = np.log(alpha) - np.log(sigma)
    n = len(alphas_cumprod)
    coef_x, coef_d = np.zeros(n), np.ones(n)  # t = 0: x_{-1} = x0 prediction (sigma = 0)
    h = lam[:-1] - lam[1:]                     # h[t - 1] for the step t -> t - 1, t >= 1
    coef_x[1:] = sigma[:-1] / sigma[1:]
    coef_d[1:] = alpha[:-1] * -np.expm1(-h)
    cur, prev = np.ones(n), np.zeros(n)
    if order == 2:
        # Second order needs a previous x0 (t < S-1). The steps into t = 0 and to sigma = 0
        # stay first order ("lower order final"): on time-uniform grids the last lambda step
        # is several times the one before it (r << 1), where the extrapolation is unstable.
        ts = np.arange(2, n - 1)
        r = h[ts] / h[ts - 1]        # h_prev (step t+1 -> t) over h (step t -> t-1)
        cur[ts] = 1 + 1 / (2 * r)
        prev[ts] = -1 / (2 * r)
    return {"x": coef_x, "d": coef_d, "cur": cur, "prev": prev}


def dpm_solver_sample_loop(diffusion, model_fn, shape, *, noise, key, order, clip_denoised,
                           denoised_fn, model_kwargs, progress, return_trajectory):
    """See GaussianDiffusion.dpm_solver_sample_loop."""
    if order not in (1, 2):
        raise ValueError(f"dpm_solver_sample_loop: order must be 1 or 2, got {order!r}")
    x_t, _, _ = sampling.initial_and_step_noise(
        shape, diffusion.num_timesteps, noise=noise, step_noise=None, key=key,
        needs_step_noise=False, what="dpm_solver_sample_loop")
    coefs = {k: jnp.asarray(v, jnp.float32)
             for k, v in step_coefficients(diffusion.alphas_cumprod, order).items()}

    def step(carry, t, _):
        x, prev_x0 = carry
        t_batch = jnp.full((x.shape[0],), t, jnp.int32)
        x0 = diffusion.p_mean_variance(model_fn, x, t_batch, clip_denoised=clip_denoised,
                                       denoised_fn=denoised_fn, model_kwargs=model_kwargs)["pred_xstart"]
        d = coefs["cur"][t] * x0 + coefs["prev"][t] * prev_x0
        x_next = coefs["x"][t] * x + coefs["d"][t] * d
        return (x_next, x0), {"sample": x_next, "pred_xstart": x0}

    (x, _), trajectory = sampling.run_steps(
        step, (x_t, jnp.zeros_like(x_t)), diffusion.num_timesteps, None, progress=progress,
        label=f"dpm-solver++({order}M)", return_trajectory=return_trajectory)
    return (x, trajectory) if return_trajectory else x
