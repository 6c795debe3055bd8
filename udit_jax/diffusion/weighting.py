"""Min-SNR-gamma loss weighting (Hang et al. 2023, arXiv 2303.09556).

The weight makes the loss on any prediction target equal to min(SNR, gamma) times the MSE
of the implied data (x0 / SiT's x1) prediction, SNR = alpha^2 / sigma^2 for
x_t = alpha data + sigma noise:
  eps (DDPM noise, SiT noise and score losses):  min(SNR, gamma) / SNR
  x0 (data):                                     min(SNR, gamma)
  velocity (SiT's u = d_alpha data + d_sigma noise):
      min(SNR, gamma) sigma^2 / (d_alpha sigma - d_sigma alpha)^2
Written as min(alpha^2, gamma sigma^2) / k^2, finite at SNR = 0 and SNR = inf.
"""

from __future__ import annotations

import jax.numpy as jnp

TARGETS = ("eps", "x0", "velocity")


def min_snr_weight(alpha, sigma, gamma: float, target: str, d_alpha=None, d_sigma=None):
    """Per-example weights (shape of alpha) for the MSE of `target`."""
    if not gamma > 0:
        raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
    clipped = jnp.minimum(alpha ** 2, gamma * sigma ** 2)
    if target == "eps":
        return clipped / alpha ** 2
    if target == "x0":
        return clipped / sigma ** 2
    if target == "velocity":
        if d_alpha is None or d_sigma is None:
            raise ValueError("min_snr_weight for velocity needs d_alpha and d_sigma")
        return clipped / (d_alpha * sigma - d_sigma * alpha) ** 2
    raise ValueError(f"min_snr target {target!r}; use one of {TARGETS}")
