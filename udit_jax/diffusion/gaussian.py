"""The Gaussian diffusion process of DiT / U-DiT (IDDPM's `GaussianDiffusion`), in JAX.

Tables are float64 numpy arrays under the official names; a value gathered for a batch of
timesteps is cast to float32 and all array arithmetic after that is float32, as upstream.
Arrays are NHWC: x [B, H, W, C]; a learned-variance model returns [B, H, W, 2C] whose last
axis splits into (eps or x0, variance values).

`model_fn(x, t, **model_kwargs)` is any callable returning the model output; it receives the
ORIGINAL timestep (`timestep_map[t]`), as upstream's `_WrappedModel` does, while every method
here takes indices `t` into this (possibly respaced) process.
"""

from __future__ import annotations

import enum
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from udit_jax.diffusion import dpm_solver, sampling

ModelFn = Callable[..., jax.Array]


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""
    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    """How the reverse-step variance is chosen. LEARNED_RANGE interpolates log-variance
    between the posterior variance (v = -1) and beta (v = +1)."""
    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()            # MSE (+ KL term when the variance is learned)
    RESCALED_MSE = enum.auto()   # MSE (+ KL * num_timesteps / 1000)
    KL = enum.auto()             # the variational bound only
    RESCALED_KL = enum.auto()    # the variational bound * num_timesteps


TABLE_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """float64 betas [num_timesteps] of the official named schedules.

    'linear': Ho et al.'s 1e-4..0.02 scaled by 1000 / num_timesteps; 'squaredcos_cap_v2':
    the cosine schedule of Nichol & Dhariwal with betas capped at 0.999.
    """
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)])
    raise ValueError(f"unknown noise_schedule {name!r}; known: {', '.join(BETA_SCHEDULES)}")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by upstream's likelihood."""
    return 0.5 * (1.0 + jnp.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of a Gaussian discretised into 8-bit bins of [-1, 1] (width 2/255), in nats.

    The two edge bins extend to -inf / +inf (x < -0.999 / x > 0.999); probabilities are
    clamped at 1e-12 before the log, as upstream.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process with the official tables and math.

    betas: [S] float64, the betas of THIS process (already respaced, see respace_betas).
    timestep_map: [S] int, the original timestep of each step (what the model is called
      with); defaults to 0..S-1.
    Build it with `create_diffusion`, which matches the official constructor.
    """

    def __init__(self, betas, timestep_map=None, *,
                 model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
                 model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
                 loss_type: LossType = LossType.MSE):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        for name, value, kind in (("model_mean_type", model_mean_type, ModelMeanType),
                                  ("model_var_type", model_var_type, ModelVarType),
                                  ("loss_type", loss_type, LossType)):
            if not isinstance(value, kind):
                raise ValueError(f"{name} must be one of {[m for m in kind]}, got {value!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = (np.arange(self.num_timesteps, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, np.int64))
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map has shape {self.timestep_map.shape}, betas {betas.shape}")

        # float64 tables, computed exactly as upstream does (same operations, same order).
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log takes the t = 1 value there.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

        # float32 copies for gathering (gather-then-cast == cast-then-gather). Derived tables
        # are formed in float64 first, as upstream forms them before its cast.
        fixed_large = np.append(self.posterior_variance[1], betas[1:])
        self._f32 = {name: getattr(self, name).astype(np.float32) for name in TABLE_NAMES}
        self._f32.update(
            one_minus_alphas_cumprod=(1.0 - self.alphas_cumprod).astype(np.float32),
            log_betas=np.log(betas).astype(np.float32),
            fixed_large_variance=fixed_large.astype(np.float32),
            fixed_large_log_variance=np.log(fixed_large).astype(np.float32),
        )

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, "
                f"timestep_map=[{self.timestep_map[0]}..{self.timestep_map[-1]}], "
                f"{self.model_mean_type.name}, {self.model_var_type.name}, {self.loss_type.name})")

    @property
    def learns_sigma(self) -> bool:
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    # ---- helpers ---------------------------------------------------------------------------

    def _gather(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        """Table `name` at indices t [B], as float32 [B, 1, ..., 1] (ndim axes)."""
        return jnp.asarray(self._f32[name])[t].reshape((-1,) + (1,) * (ndim - 1))

    def _check_t(self, x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.asarray(t)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = ({x.shape[0]},) for x of shape {x.shape}, "
                             f"got {t.shape}")
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"t holds step indices and must be an integer array, got {t.dtype}")
        return t

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """The original timesteps (what the model sees) for step indices t of this process."""
        return jnp.asarray(self.timestep_map, jnp.int32)[t]

    def _call_model(self, model_fn: ModelFn, x, t, model_kwargs) -> jax.Array:
        out = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        out = jnp.asarray(out, jnp.float32)  # diffusion arithmetic in float32 whatever the model computes in
        channels = x.shape[-1] * (2 if self.learns_sigma else 1)
        if out.shape != x.shape[:-1] + (channels,):
            raise ValueError(
                f"model output has shape {out.shape}, expected {x.shape[:-1] + (channels,)} for x "
                f"{x.shape} (NHWC; {'2C: prediction and variance values' if self.learns_sigma else 'C'}); "
                "check learn_sigma and that the model takes and returns channels-last arrays")
        return out

    # ---- forward process -------------------------------------------------------------------

    def q_mean_variance(self, x_start: jax.Array, t: jax.Array):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like x_start."""
        t = self._check_t(x_start, t)
        n = x_start.ndim
        mean = self._gather("sqrt_alphas_cumprod", t, n) * x_start
        variance = jnp.broadcast_to(self._gather("one_minus_alphas_cumprod", t, n), x_start.shape)
        log_variance = jnp.broadcast_to(self._gather("log_one_minus_alphas_cumprod", t, n), x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; all [B, H, W, C]."""
        t = self._check_t(x_start, t)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        n = x_start.ndim
        return (self._gather("sqrt_alphas_cumprod", t, n) * x_start
                + self._gather("sqrt_one_minus_alphas_cumprod", t, n) * noise)

    def q_posterior_mean_variance(self, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        t = self._check_t(x_t, t)
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {x_start.shape} != x_t shape {x_t.shape}")
        n = x_t.ndim
        mean = (self._gather("posterior_mean_coef1", t, n) * x_start
                + self._gather("posterior_mean_coef2", t, n) * x_t)
        variance = jnp.broadcast_to(self._gather("posterior_variance", t, n), x_t.shape)
        log_variance = jnp.broadcast_to(self._gather("posterior_log_variance_clipped", t, n), x_t.shape)
        return mean, variance, log_variance

    # ---- reverse process -------------------------------------------------------------------

    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return (self._gather("sqrt_recip_alphas_cumprod", t, n) * x_t
                - self._gather("sqrt_recipm1_alphas_cumprod", t, n) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return ((self._gather("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart)
                / self._gather("sqrt_recipm1_alphas_cumprod", t, n))

    def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, *,
                        clip_denoised: bool = True, denoised_fn: Callable | None = None,
                        model_kwargs: dict | None = None) -> dict[str, jax.Array]:
        """p(x_{t-1} | x_t) from the model, and its prediction of x_0.

        x: [B, H, W, C]; t: [B] step indices of this process. clip_denoised clamps the x_0
        prediction to [-1, 1] (after denoised_fn). Returns {"mean", "variance",
        "log_variance", "pred_xstart"}, each [B, H, W, C].
        """
        t = self._check_t(x, t)
        output = self._call_model(model_fn, x, t, model_kwargs)
        return self.p_mean_variance_from_output(output, x, t, clip_denoised=clip_denoised,
                                                denoised_fn=denoised_fn)

    def p_mean_variance_from_output(self, model_output: jax.Array, x: jax.Array, t: jax.Array, *,
                                    clip_denoised: bool = True,
                                    denoised_fn: Callable | None = None) -> dict[str, jax.Array]:
        """p_mean_variance for an already computed model output [B, H, W, C or 2C]."""
        n = x.ndim
        if self.learns_sigma:
            prediction, var_values = jnp.split(model_output, 2, axis=-1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self._gather("posterior_log_variance_clipped", t, n)
                max_log = self._gather("log_betas", t, n)
                frac = (var_values + 1) / 2  # v in [-1, 1] spans [posterior variance, beta]
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            prediction = model_output
            small = self.model_var_type == ModelVarType.FIXED_SMALL
            variance = jnp.broadcast_to(self._gather(
                "posterior_variance" if small else "fixed_large_variance", t, n), x.shape)
            log_variance = jnp.broadcast_to(self._gather(
                "posterior_log_variance_clipped" if small else "fixed_large_log_variance", t, n), x.shape)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = prediction
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, prediction)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, *,
                 noise: jax.Array | None = None, key: jax.Array | None = None,
                 clip_denoised: bool = True, denoised_fn: Callable | None = None,
                 model_kwargs: dict | None = None) -> dict[str, jax.Array]:
        """One ancestral step x_t -> x_{t-1} = mean + [t != 0] exp(log_variance / 2) noise.

        noise: [B, H, W, C] standard normal (or drawn from `key`). Returns {"sample",
        "pred_xstart"}.
        """
        noise = sampling.noise_like(x, noise, key, "p_sample")
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        nonzero = (jnp.asarray(t) != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, *, eta: float = 0.0,
                    noise: jax.Array | None = None, key: jax.Array | None = None,
                    clip_denoised: bool = True, denoised_fn: Callable | None = None,
                    model_kwargs: dict | None = None) -> dict[str, jax.Array]:
        """One DDIM step (eq. 12 of Song et al.) from step t to t - 1 of this process.

        eta = 0 is deterministic (no noise needed); eta > 0 needs `noise` or `key`.
        Returns {"sample", "pred_xstart"}.
        """
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        # eps is re-derived from the (possibly clipped) x_0 prediction, as upstream.
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._gather("alphas_cumprod", t, x.ndim)
        alpha_bar_prev = self._gather("alphas_cumprod_prev", t, x.ndim)
        sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
        sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        if eta != 0:
            noise = sampling.noise_like(x, noise, key, "ddim_sample with eta > 0")
            nonzero = (jnp.asarray(t) != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ---- training --------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t) -> jax.Array:
        """Per-example variational-bound term in bits: the decoder NLL at t = 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)). [B]"""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        kl = kl / np.float32(np.log(2.0))
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.float32(np.log(2.0))
        return jnp.where(t == 0, decoder_nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array, *,
                        model_kwargs: dict | None = None, noise: jax.Array | None = None,
                        key: jax.Array | None = None) -> dict[str, jax.Array]:
        """Per-example training losses at step indices t [B] for data x_start [B, H, W, C].

        noise: the eps of q_sample (or drawn from `key`). Returns {"loss", "mse", "vb"} ([B]
        each) for MSE losses with a learned variance (the DiT default: loss = mse + vb, where
        vb sees the eps prediction through stop_gradient, so it only trains the variance);
        {"loss", "mse"} for a fixed variance; {"loss"} for the KL losses.
        """
        t = self._check_t(x_start, t)
        noise = sampling.noise_like(x_start, noise, key, "training_losses")
        x_t = self.q_sample(x_start, t, noise)

        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            output = self._call_model(model_fn, x_t, t, model_kwargs)
            loss = self._vb_terms_bpd(output, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}

        output = self._call_model(model_fn, x_t, t, model_kwargs)
        terms = {}
        if self.learns_sigma:
            prediction, var_values = jnp.split(output, 2, axis=-1)
            # The bound trains the variance only: the mean prediction is frozen in it.
            frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            prediction = output
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ---- sampling loops (one XLA loop each; see sampling.py / dpm_solver.py) ----------------

    def p_sample_loop(self, model_fn: ModelFn, shape, *, noise=None, step_noise=None, key=None,
                      clip_denoised: bool = True, denoised_fn=None, model_kwargs=None,
                      progress: int | None = None, return_trajectory: bool = False,
                      step_noise_fn: Callable | None = None):
        """Ancestral (DDPM) sampling over all steps of this process, t = S-1 ... 0.

        shape: (B, H, W, C). noise: the start x_T [B, H, W, C]; step_noise: [S, B, H, W, C],
        the noise of each step in order (step k is t = S-1-k), or step_noise_fn(t) ->
        [B, H, W, C] drawing it inside the loop (e.g. from each image's own key). Either may
        be omitted when `key` is given, which then draws what is missing. progress=k prints "k/S steps"
        every k steps from inside the compiled loop. Returns the final x [B, H, W, C]; with
        return_trajectory, also {"sample", "pred_xstart"} stacked per step ([S, B, H, W, C]).
        """
        return sampling.p_sample_loop(self, model_fn, shape, noise=noise, step_noise=step_noise,
                                      key=key, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                      model_kwargs=model_kwargs, progress=progress,
                                      return_trajectory=return_trajectory,
                                      step_noise_fn=step_noise_fn)

    def ddim_sample_loop(self, model_fn: ModelFn, shape, *, noise=None, step_noise=None, key=None,
                         eta: float = 0.0, clip_denoised: bool = True, denoised_fn=None,
                         model_kwargs=None, progress: int | None = None,
                         return_trajectory: bool = False, step_noise_fn: Callable | None = None):
        """DDIM sampling over all steps of this process (use create_diffusion("ddim50") or
        "50" for 50 steps). Arguments as p_sample_loop; step noise is needed only for eta > 0."""
        return sampling.ddim_sample_loop(self, model_fn, shape, noise=noise, step_noise=step_noise,
                                         key=key, eta=eta, clip_denoised=clip_denoised,
                                         denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                         progress=progress, return_trajectory=return_trajectory,
                                         step_noise_fn=step_noise_fn)

    def dpm_solver_sample_loop(self, model_fn: ModelFn, shape, *, noise=None, key=None,
                               order: int = 2, clip_denoised: bool = False, denoised_fn=None,
                               model_kwargs=None, progress: int | None = None,
                               return_trajectory: bool = False):
        """DPM-Solver++ (multistep, data prediction) over the steps of this process: a
        deterministic ODE sampler, typically as good in 20 steps as DDPM in 250. order=2 is
        DPM-Solver++(2M); order=1 is DDIM (eta = 0). The learned variance is not used."""
        return dpm_solver.dpm_solver_sample_loop(
            self, model_fn, shape, noise=noise, key=key, order=order, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, model_kwargs=model_kwargs, progress=progress,
            return_trajectory=return_trajectory)
