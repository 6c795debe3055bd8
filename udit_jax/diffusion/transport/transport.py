"""SiT's Transport: eps rules, time intervals, training losses, drift and score of a model.

Conventions as the official `transport` package: t = 0 is noise, t = 1 is data,
x_t = alpha_t x1 + sigma_t x0 with data x1 and noise x0 ~ N(0, I). `model_fn(x, t, **kw)`
gets x [B, H, W, C] and t [B] (in x's dtype) and predicts velocity, noise or score; a model
with a learned-sigma half (2C output channels) is used through its first C channels, as SiT's
forward does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from udit_jax.diffusion.transport import path as path_lib

PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")

ModelFn = Callable[..., jax.Array]


def mean_flat(x):
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def model_output(model_fn: ModelFn, x, t, model_kwargs: dict):
    """model_fn(x, t, **kw) with the learned-sigma half dropped: [B, ..., C] for x [B, ..., C]."""
    out = model_fn(x, t, **model_kwargs)
    c = x.shape[-1]
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (c, 2 * c):
        raise ValueError(f"the model returned shape {out.shape} for input {x.shape}; transport needs "
                         f"{c} output channels (or {2 * c} with a learned-sigma half)")
    return out[..., :c]


@dataclasses.dataclass(frozen=True)
class Transport:
    """A path, a prediction type and a loss weight, with the eps create_transport chose."""
    path_type: str
    prediction: str
    loss_weight: str | None
    train_eps: float | None
    sample_eps: float | None

    @property
    def path_sampler(self) -> path_lib.LinearPath:
        return path_lib.make_path(self.path_type)

    def prior_logp(self, z):
        """log N(z; 0, I) per example: [B, ...] -> [B]."""
        n = math.prod(z.shape[1:])
        return -n / 2.0 * np.log(2 * np.pi) - jnp.sum(z ** 2, axis=tuple(range(1, z.ndim))) / 2.0

    def check_interval(self, *, diffusion_form: str = "SBDM", sde: bool = False,
                       reverse: bool = False, eval: bool = False,
                       last_step_size: float = 0.0) -> tuple[float, float]:
        """(t0, t1) of training (eval=False) or of a sampler, as SiT's check_interval.

        VP clips only the top end; Linear/GVP clip both ends for noise/score models and for
        SDEs (the bottom only with SBDM diffusion); a velocity ODE on Linear/GVP runs on (0, 1).
        An SDE with a last step ends at 1 - last_step_size. reverse gives (1 - t0, 1 - t1).
        """
        t0, t1 = 0, 1
        eps = self.sample_eps if eval else self.train_eps
        if self.path_type == "VP":
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif self.prediction != "velocity" or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    def sample_t(self, u):
        """Training times from unit draws u [B] (SiT: u ~ U[0, 1)): t = u (t1 - t0) + t0."""
        t0, t1 = self.check_interval()
        return u * (t1 - t0) + t0

    def training_losses(self, model_fn: ModelFn, x1, model_kwargs: dict | None = None, *,
                        key: jax.Array | None = None, u=None, noise=None) -> dict[str, jax.Array]:
        """Per-example loss of data x1 [B, H, W, C], as SiT's Transport.training_losses.

        u [B]: the uniform draws giving t (see sample_t); noise: x0 [B, H, W, C]. Either may be
        omitted when `key` is given, which then draws it. Returns {"loss" [B], "pred", "t",
        "xt", "ut", "x0"} and, for noise/score models, "weight" [B, 1, 1, 1].
        """
        model_kwargs = model_kwargs or {}
        k_u = k_noise = None
        if key is not None:
            k_u, k_noise = jax.random.split(key)
        if u is None:
            if k_u is None:
                raise ValueError("training_losses needs the time draws: pass u=<[B] array> or key=")
            u = jax.random.uniform(k_u, x1.shape[:1], jnp.float32)
        if noise is None:
            if k_noise is None:
                raise ValueError("training_losses needs the noise x0: pass noise=<array like x1> or key=")
            noise = jax.random.normal(k_noise, x1.shape, x1.dtype)
        u = jnp.asarray(u)
        if u.shape != x1.shape[:1] or noise.shape != x1.shape:
            raise ValueError(f"training_losses: u {u.shape} and noise {noise.shape} must be "
                             f"{x1.shape[:1]} and {x1.shape} for x1 {x1.shape}")
        t = self.sample_t(u).astype(x1.dtype)
        x0 = noise.astype(x1.dtype)
        path = self.path_sampler
        t, xt, ut = path.plan(t, x0, x1)
        pred = model_output(model_fn, xt, t, model_kwargs)
        terms = {"pred": pred, "t": t, "xt": xt, "ut": ut, "x0": x0}
        if self.prediction == "velocity":
            terms["loss"] = mean_flat((pred - ut) ** 2)
            return terms
        _, drift_var = path.compute_drift(xt, t)
        sigma_t, _ = path.compute_sigma_t(path_lib.expand_t_like_x(t, xt))
        if self.loss_weight == "velocity":
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_weight == "likelihood":
            weight = drift_var / (sigma_t ** 2)
        else:
            weight = jnp.ones_like(sigma_t)
        if self.prediction == "noise":
            terms["loss"] = mean_flat(weight * ((pred - x0) ** 2))
        else:
            terms["loss"] = mean_flat(weight * ((pred * sigma_t + x0) ** 2))
        terms["weight"] = weight
        return terms

    def get_drift(self) -> Callable:
        """drift(x, t, model_fn, **kw): the probability-flow ODE's velocity field."""
        path = self.path_sampler

        def drift(x, t, model_fn, **model_kwargs):
            out = model_output(model_fn, x, t, model_kwargs)
            if self.prediction == "velocity":
                return out
            drift_mean, drift_var = path.compute_drift(x, t)
            if self.prediction == "noise":
                sigma_t, _ = path.compute_sigma_t(path_lib.expand_t_like_x(t, x))
                out = out / -sigma_t
            return -drift_mean + drift_var * out

        return drift

    def get_score(self) -> Callable:
        """score(x, t, model_fn, **kw): grad log p_t(x)."""
        path = self.path_sampler

        def score(x, t, model_fn, **model_kwargs):
            out = model_output(model_fn, x, t, model_kwargs)
            if self.prediction == "noise":
                return out / -path.compute_sigma_t(path_lib.expand_t_like_x(t, x))[0]
            if self.prediction == "score":
                return out
            return path.get_score_from_velocity(out, x, t)

        return score


def create_transport(path_type: str = "Linear", prediction: str = "velocity",
                     loss_weight: str | None = None, train_eps: float | None = None,
                     sample_eps: float | None = None) -> Transport:
    """The Transport SiT's create_transport builds, argument for argument.

    path_type: "Linear", "GVP" or "VP"; prediction: "velocity", "noise" or "score";
    loss_weight: None, "velocity" or "likelihood" (noise/score models only; ignored for
    velocity, as upstream). eps rules, upstream's quirks included:
      VP: train_eps defaults to 1e-5, sample_eps to 1e-3 *when train_eps is None*
          (a sample_eps passed alone is replaced);
      Linear/GVP noise/score: both default to 1e-3 on the same rule;
      Linear/GVP velocity: both are 0 whatever is passed.
    Unlike upstream, unknown names are refused instead of falling back to a default.
    """
    if path_type not in path_lib.PATH_TYPES:
        raise ValueError(f"path_type={path_type!r}; use one of {path_lib.PATH_TYPES}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; use one of {PREDICTIONS}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight={loss_weight!r}; use one of {LOSS_WEIGHTS}")
    for name, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
        if eps is not None and not 0 <= eps < 0.5:
            raise ValueError(f"{name}={eps!r}; use None (SiT's default) or a value in [0, 0.5)")
    if path_type == "VP":
        train_eps, sample_eps = (1e-5, 1e-3) if train_eps is None else (train_eps, sample_eps)
    elif prediction != "velocity":
        train_eps, sample_eps = (1e-3, 1e-3) if train_eps is None else (train_eps, sample_eps)
    else:  # velocity on Linear/GVP is finite on [0, 1]
        train_eps, sample_eps = 0, 0
    return Transport(path_type=path_type, prediction=prediction, loss_weight=loss_weight,
                     train_eps=train_eps, sample_eps=sample_eps)
