"""Interpolation paths x_t = alpha_t * x1 + sigma_t * x0 of SiT (t = 0 noise, t = 1 data).

Linear (SiT's ICPlan), GVP (GVPCPlan) and VP (VPCPlan), with the drift / diffusion of the
matching SDE and the conversions between velocity, score and noise. Every function follows
the dtype of its inputs, and the operations run in SiT's order (its float32 rounding is what
the parity fixtures pin down). `t` is per example, [B]; `x` is [B, ...] (NHWC for images).
"""

from __future__ import annotations

import jax.numpy as jnp

PATH_TYPES = ("Linear", "GVP", "VP")
# SiT's keys, its misspelling "inccreasing-decreasing" included; "constant" is left out
# because upstream crashes on it (sqrt of a Python float).
DIFFUSION_FORMS = ("SBDM", "sigma", "linear", "decreasing", "inccreasing-decreasing")

VP_SIGMA_MIN = 0.1
VP_SIGMA_MAX = 20.0


def expand_t_like_x(t, x):
    """t [B] -> [B, 1, ..., 1], broadcastable against x [B, ...]."""
    return jnp.reshape(t, t.shape[:1] + (1,) * (x.ndim - 1))


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t (SiT's ICPlan)."""

    def compute_alpha_t(self, t):
        """(alpha_t, d alpha_t / dt)."""
        return t, 1

    def compute_sigma_t(self, t):
        """(sigma_t, d sigma_t / dt)."""
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t):
        return 1 / t

    def compute_drift(self, x, t):
        """(drift_mean [B, ...], drift_var [B, 1, ...]) of the SDE in score parametrisation."""
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return -(ratio * x), ratio * (sigma_t ** 2) - sigma_t * d_sigma_t

    def compute_diffusion(self, x, t, form: str, norm: float):
        """The SDE's diffusion D(t) [B, 1, ...] (the noise enters as sqrt(2 D) dW)."""
        t = expand_t_like_x(t, x)
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1) ** 2
        if form == "inccreasing-decreasing":
            return norm * jnp.sin(jnp.pi * t) ** 2
        raise ValueError(f"diffusion_form={form!r}; use one of {DIFFUSION_FORMS}")

    def get_score_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_noise_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = reverse_alpha_ratio * d_sigma_t - sigma_t
        return (reverse_alpha_ratio * velocity - x) / var

    def get_velocity_from_score(self, score, x, t):
        t = expand_t_like_x(t, x)
        drift_mean, drift_var = self.compute_drift(x, t)
        return drift_var * score - drift_mean

    def plan(self, t, x0, x1):
        """(t, x_t, u_t): the point on the path between noise x0 and data x1 and its velocity."""
        te = expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = self.compute_alpha_t(te)
        sigma_t, d_sigma_t = self.compute_sigma_t(te)
        return t, alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0


class GVPPath(LinearPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (SiT's GVPCPlan)."""

    def compute_alpha_t(self, t):
        return jnp.sin(t * jnp.pi / 2), (jnp.pi / 2) * jnp.cos(t * jnp.pi / 2)

    def compute_sigma_t(self, t):
        return jnp.cos(t * jnp.pi / 2), (-jnp.pi / 2) * jnp.sin(t * jnp.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t):
        # torch computes `pi / tensor` as reciprocal(tensor) * pi: one ulp from a division.
        return jnp.reciprocal(2 * jnp.tan(t * jnp.pi / 2)) * jnp.pi


class VPPath(LinearPath):
    """The variance-preserving path of score-based diffusion, beta from 0.1 to 20 (VPCPlan)."""

    def _log_mean_coeff(self, t):
        one_minus = 1 - t
        return ((-0.25 * (one_minus ** 2)) * (VP_SIGMA_MAX - VP_SIGMA_MIN)
                - (0.5 * one_minus) * VP_SIGMA_MIN)

    def _d_log_mean_coeff(self, t):
        return (0.5 * (1 - t)) * (VP_SIGMA_MAX - VP_SIGMA_MIN) + 0.5 * VP_SIGMA_MIN

    def compute_alpha_t(self, t):
        alpha_t = jnp.exp(self._log_mean_coeff(t))
        return alpha_t, alpha_t * self._d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        p_sigma_t = 2 * self._log_mean_coeff(t)
        # No expm1, as upstream: badly conditioned near t = 1 in float32, and pinned by parity.
        sigma_t = jnp.sqrt(1 - jnp.exp(p_sigma_t))
        d_sigma_t = jnp.exp(p_sigma_t) * (2 * self._d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self._d_log_mean_coeff(t)

    def compute_drift(self, x, t):
        t = expand_t_like_x(t, x)
        beta_t = VP_SIGMA_MIN + (1 - t) * (VP_SIGMA_MAX - VP_SIGMA_MIN)
        return -0.5 * beta_t * x, beta_t / 2


def make_path(path_type: str) -> LinearPath:
    paths = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
    if path_type not in paths:
        raise ValueError(f"path_type={path_type!r}; use one of {PATH_TYPES}")
    return paths[path_type]()
