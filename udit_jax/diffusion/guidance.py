"""The guidance interval (Kynkaanniemi et al. 2024): classifier-free guidance only at a middle
range of noise levels, plain conditional prediction elsewhere.

The interval is in noise level u in [0, 1] (0 = data, 1 = noise), common to both objectives:
DDPM step t of T steps is u = t / T, SiT time t is u = 1 - t. Guidance applies where
t_low <= u <= t_high; (0, 1) is plain guidance and an empty interval (t_low > t_high) none.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def ddpm_noise_level(num_timesteps: int) -> Callable:
    """u(t) for the original DDPM step index t the model gets."""
    return lambda t: jnp.asarray(t, jnp.float32) / num_timesteps


def transport_noise_level(t):
    """u(t) for SiT's time (t = 1 is data)."""
    return 1 - jnp.asarray(t, jnp.float32)


def check_interval(interval) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be two noise levels (t_low, t_high), got "
                         f"{interval!r}") from None
    if not (0 <= low <= 1 and 0 <= high <= 1):
        raise ValueError(f"guidance interval {interval!r}: both ends must lie in [0, 1] (noise "
                         "level: 0 data, 1 noise); (0, 1) guides everywhere")
    return low, high


def guidance_scale(cfg_scale, noise_level, interval):
    """cfg_scale where noise_level [B] lies in the interval, 1 (no guidance) elsewhere."""
    low, high = check_interval(interval)
    inside = (noise_level >= low) & (noise_level <= high)
    return jnp.where(inside, jnp.asarray(cfg_scale, jnp.float32), 1.0)


def with_guidance_interval(forward_with_cfg: Callable, interval, noise_level: Callable) -> Callable:
    """forward_with_cfg(x, t, y, cfg_scale) guided only inside `interval`, same signature.

    forward_with_cfg: the official convention (x, t, y of 2B rows: conditional half, then
    the null-class half) taking a per-example scale [B, 1, ..., 1]; noise_level maps the
    model's t to u (ddpm_noise_level(T) or transport_noise_level).
    """
    def fn(x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale):
        half = t[: t.shape[0] // 2]
        scale = guidance_scale(cfg_scale, noise_level(half), interval)
        return forward_with_cfg(x, t, y, scale.reshape(half.shape + (1,) * (x.ndim - 1)))

    return fn
