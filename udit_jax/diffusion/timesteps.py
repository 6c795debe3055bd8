"""Training-time sampling: uniform, or logit-normal (SD3; LightningDiT's default).

Both objectives draw a unit level and map it to their own time: DDPM's integer step
t = floor(u T) with u the noise level (1 = noise), and SiT's t in [t0, t1) with u the data
level (1 = data). `mean > 0` shifts the logit-normal towards noisier times in both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class TimestepSampling:
    """kind "uniform", or "logit_normal": noise level sigmoid(mean + std * n), n ~ N(0, 1)."""
    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.kind not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep sampling {self.kind!r}; use one of {TIMESTEP_SAMPLINGS}")
        if self.kind == "logit_normal" and not self.std > 0:
            raise ValueError(f"logit_normal timestep sampling needs std > 0, got {self.std}")

    def noise_level(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        """u in [0, 1) per example, 0 = data, 1 = noise."""
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype)
        return jax.nn.sigmoid(self.mean + self.std * jax.random.normal(key, shape, dtype))

    def data_level(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        """1 - noise level, drawn directly: SiT's u (t = u (t1 - t0) + t0), 1 = data."""
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype)
        return jax.nn.sigmoid(-(self.mean + self.std * jax.random.normal(key, shape, dtype)))

    def ddpm_steps(self, key: jax.Array, shape, num_timesteps: int) -> jax.Array:
        """DDPM step indices [shape] int32 in [0, num_timesteps): uniform is randint, as DiT."""
        if self.kind == "uniform":
            return jax.random.randint(key, shape, 0, num_timesteps)
        u = self.noise_level(key, shape)
        return jnp.minimum(jnp.floor(u * num_timesteps), num_timesteps - 1).astype(jnp.int32)
