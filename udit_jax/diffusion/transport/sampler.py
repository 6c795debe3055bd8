"""SiT's Sampler: probability-flow ODE, likelihood ODE and SDE sampling of a Transport.

Each `sample_*` method checks its settings (refusing, with the reason, those upstream
crashes on or turns into NaN) and returns a pure function of (initial state, model_fn,
**model_kwargs), as SiT's do; the loop inside is one `lax.scan`. Random draws are inputs:
the SDE takes `noise=` [num_steps - 1, B, ...], `noise_fn=` (step -> noise) or `key=`, the
likelihood `probes=`, `probes_fn=` or `key=`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from udit_jax.diffusion.transport import integrators
from udit_jax.diffusion.transport import path as path_lib
from udit_jax.diffusion.transport.transport import Transport

LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def _float_dtype(x) -> np.dtype:
    dtype = np.dtype(x.dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"the sampler's initial state must be a float array, got {dtype}")
    return dtype


def _batch_t(t, x):
    """A scalar time as the per-example vector [B] the model gets."""
    return jnp.full(x.shape[:1], t, x.dtype)


def step_draws(what: str, num_steps: int, shape, *, given, given_fn, key, draw: Callable):
    """The random input of each of num_steps loop steps, without materialising them all.

    Returns (scan inputs with leading axis num_steps or None, get(input, i) -> the draw of
    step i [shape]). Sources, first given wins: `given` [num_steps, *shape] (replay stored
    draws), `given_fn(i)` (e.g. each image's noise from its own key), or `key` (split per
    step; draw(key, shape) runs inside the loop).
    """
    shape = tuple(shape)
    if given is not None:
        given = jnp.asarray(given)
        if given.shape != (num_steps,) + shape:
            raise ValueError(f"{what} has shape {given.shape}, expected {(num_steps,) + shape} "
                             "(one draw per step, in order)")
        return given, lambda g, i: g
    if given_fn is not None:
        return None, lambda _, i: given_fn(i)
    if key is None:
        raise ValueError(f"this sampler draws {what} at every step: pass {what}=<array of shape "
                         f"{(num_steps,) + shape}>, {what}_fn=<step -> array> or key=")
    return jax.random.split(key, num_steps), lambda k, i: draw(k, shape)


@dataclasses.dataclass(frozen=True)
class SamplingFn:
    """fn(init, model_fn, **model_kwargs) -> the trajectory [num_steps, B, ...], as SiT's.

    `final(init, model_fn, **model_kwargs)` returns only the last state [B, ...] (no
    trajectory is kept). SDE functions also take noise= / key= (see Sampler.sample_sde).
    """
    run: Callable
    num_steps: int
    t_interval: tuple[float, float]
    stochastic: bool

    def __call__(self, init, model_fn, **kwargs):
        return self.run(init, model_fn, keep_trajectory=True, **kwargs)

    def final(self, init, model_fn, **kwargs):
        return self.run(init, model_fn, keep_trajectory=False, **kwargs)


class Sampler:
    """Samplers of a Transport (SiT's `Sampler(transport)`)."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    # ---- which settings give finite numbers ---------------------------------------------

    def _singular_ends(self, *, sde: bool, diffusion_form: str | None) -> dict[float, tuple[str, str]]:
        """{time: (what divides by zero there, how to avoid it)} for this sampler's drift/score."""
        tr = self.transport
        eps_hint = "Use sample_eps > 0 (create_transport(train_eps=..., sample_eps=...))."
        ends = {}
        if tr.path_type != "VP" and tr.prediction != "velocity":
            ends[0.0] = ("d alpha / alpha = 1/alpha_t", eps_hint)
        if tr.path_type != "VP" and sde and diffusion_form == "SBDM":
            ends[0.0] = ("the SBDM diffusion (1/alpha_t)",
                         "Use another diffusion_form (SiT's sample.py uses 'sigma')."
                         if tr.prediction == "velocity" else eps_hint)
        if tr.prediction == "noise":
            ends[1.0] = ("the noise-to-score conversion (1/sigma_t)", eps_hint)
        if tr.prediction == "velocity" and sde:
            ends[1.0] = ("the velocity-to-score conversion (1/sigma_t^2)",
                         "Use last_step 'Mean', 'Tweedie' or 'Euler' with last_step_size > 0, or "
                         "sampling_method 'Euler' with last_step=None."
                         if tr.path_type != "VP" else eps_hint)
        return ends

    def _check_times(self, what: str, times: dict[str, float], *, sde: bool,
                     diffusion_form: str | None = None) -> None:
        ends = self._singular_ends(sde=sde, diffusion_form=diffusion_form)
        for end, (reason, hint) in ends.items():
            for name, t in times.items():
                if np.float32(t) == end:
                    raise ValueError(
                        f"{what} evaluates the model at {name} t={t} where {reason} is infinite: "
                        f"SiT returns NaN for path_type={self.transport.path_type!r}, "
                        f"prediction={self.transport.prediction!r} there. {hint}")

    def _interval(self, **kwargs) -> tuple[float, float]:
        if self.transport.sample_eps is None:
            raise ValueError("this transport has sample_eps=None (train_eps was passed without "
                             "sample_eps), so SiT's samplers fail; pass sample_eps as well")
        return self.transport.check_interval(eval=True, **kwargs)

    # ---- ODE -------------------------------------------------------------------------------

    def _ode_settings(self, sampling_method: str, num_steps: int, reverse: bool):
        if sampling_method not in integrators.ODE_METHODS:
            raise ValueError(f"sampling_method={sampling_method!r}; use one of "
                             f"{integrators.ODE_METHODS}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps={num_steps!r}: SiT's num_steps counts grid points, so it "
                             "needs at least 2 (num_steps - 1 solver steps)")
        return self._interval(sde=False, reverse=reverse, last_step_size=0.0)

    def sample_ode(self, *, sampling_method: str = "euler", num_steps: int = 50,
                   atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False) -> SamplingFn:
        """Probability-flow ODE from noise (t0) to data (t1), or back with reverse=True.

        num_steps grid points torch.linspace(t0, t1, num_steps), i.e. num_steps - 1 steps of
        the fixed-step methods (euler, midpoint, heun2, heun3, rk4: torchdiffeq's, bit for bit
        up to float rounding). "dopri5" (SiT's default) steps adaptively to atol/rtol and
        reports the state at the grid points; fixed-step methods ignore atol/rtol. Returns
        fn(z [B, ...], model_fn, **model_kwargs) -> [num_steps, B, ...] (z first).
        """
        t0, t1 = self._ode_settings(sampling_method, num_steps, reverse)
        evaluated = {"the start": t0}
        if sampling_method in integrators.ODE_METHODS_AT_END:
            evaluated["the end"] = t1
        self._check_times("sample_ode", evaluated, sde=False)
        drift = self.drift

        def run(z, model_fn, *, keep_trajectory, **model_kwargs):
            grid = integrators.time_grid(t0, t1, num_steps, _float_dtype(z))
            f = lambda t, x: drift(x, _batch_t(t, x), model_fn, **model_kwargs)
            if sampling_method in integrators.ADAPTIVE_ODE_METHODS:
                return integrators.integrate_adaptive(f, z, grid, rtol=rtol, atol=atol,
                                                      keep_trajectory=keep_trajectory)
            return integrators.integrate_ode(sampling_method, f, z, grid,
                                             keep_trajectory=keep_trajectory)

        return SamplingFn(run, num_steps, (t0, t1), stochastic=False)

    def sample_ode_likelihood(self, *, sampling_method: str = "euler", num_steps: int = 50,
                              atol: float = 1e-6, rtol: float = 1e-3) -> Callable:
        """log p(x) through the ODE from data to noise, with Hutchinson's divergence estimate.

        Returns fn(x [B, ...], model_fn, *, probes=None, probes_fn=None, key=None,
        return_trajectory=False, **model_kwargs) -> (logp [B], z [B, ...]) (plus (traj_x,
        traj_dlogp) with return_trajectory). probes: the 0/1 draws [evaluations, B, ...] of
        SiT's Rademacher probes (2 probe - 1), one per drift evaluation in order; or
        probes_fn(step) -> [evaluations per step, B, ...]; or key= to draw them.
        """
        del atol, rtol
        if sampling_method not in integrators.FIXED_STEP_ODE_METHODS:
            raise ValueError(f"sample_ode_likelihood draws one probe per drift evaluation, so it "
                             f"needs a fixed-step method, one of {integrators.FIXED_STEP_ODE_METHODS}; "
                             f"got {sampling_method!r}")
        t0, t1 = self._ode_settings(sampling_method, num_steps, reverse=False)
        # The drift runs at t = 1 - s for s in [t0, t1].
        evaluated = {"the start": 1 - t0}
        if sampling_method in integrators.ODE_METHODS_AT_END:
            evaluated["the end"] = 1 - t1
        self._check_times("sample_ode_likelihood", evaluated, sde=False)
        stages = integrators.ODE_STAGES[sampling_method]
        drift = self.drift

        def fn(x, model_fn, *, probes=None, probes_fn=None, key=None, return_trajectory=False,
               **model_kwargs):
            dtype = _float_dtype(x)
            per_step = (stages,) + x.shape
            if probes is not None:
                if tuple(probes.shape) != ((num_steps - 1) * stages,) + x.shape:
                    raise ValueError(f"probes has shape {probes.shape}, expected "
                                     f"{((num_steps - 1) * stages,) + x.shape} (one per drift "
                                     "evaluation, in order)")
                probes = jnp.reshape(probes, (num_steps - 1,) + per_step)
            inputs, get = step_draws("probes", num_steps - 1, per_step, given=probes,
                                     given_fn=probes_fn, key=key,
                                     draw=lambda k, s: jax.random.bernoulli(k, 0.5, s).astype(dtype))
            grid = integrators.time_grid(t0, t1, num_steps, dtype)

            def field(s, y, step_input, stage):
                x_s, _ = y
                e = get(step_input[0], step_input[1])[stage].astype(dtype) * 2 - 1
                t = _batch_t(1 - s, x_s)
                out, vjp = jax.vjp(lambda v: drift(v, t, model_fn, **model_kwargs), x_s)
                logp_grad = jnp.sum(vjp(e)[0] * e, axis=tuple(range(1, x_s.ndim)))
                return -out, logp_grad

            out = integrators.integrate_ode(
                sampling_method, field, (x, jnp.zeros(x.shape[:1], dtype)), grid,
                step_inputs=(inputs, jnp.arange(num_steps - 1)),
                keep_trajectory=return_trajectory)
            z, dlogp = jax.tree.map(lambda a: a[-1], out) if return_trajectory else out
            logp = self.transport.prior_logp(z) - dlogp
            return (logp, z, out) if return_trajectory else (logp, z)

        return fn

    # ---- SDE -------------------------------------------------------------------------------

    def sample_sde(self, *, sampling_method: str = "Euler", diffusion_form: str = "SBDM",
                   diffusion_norm: float = 1.0, last_step: str | None = "Mean",
                   last_step_size: float = 0.04, num_steps: int = 250) -> SamplingFn:
        """The SDE with drift v + D * score and noise sqrt(2 D) dW, from noise to data.

        num_steps - 1 stochastic steps on torch.linspace(t0, t1, num_steps), all of size
        T[1] - T[0], then `last_step` at t1: None (identity; last_step_size becomes 0, moving
        t1), "Mean" (x + sde_drift * size), "Euler" (x + ODE drift * size) or "Tweedie"
        (the posterior mean). Returns fn(z, model_fn, *, noise=None, noise_fn=None, key=None,
        **model_kwargs) -> [num_steps, B, ...]; noise: the standard normal draws
        [num_steps - 1, B, ...], or noise_fn(step) -> [B, ...], or key= to draw them.
        """
        if sampling_method not in integrators.SDE_METHODS:
            raise ValueError(f"sampling_method={sampling_method!r}; use one of {integrators.SDE_METHODS}")
        if diffusion_form == "increasing-decreasing":
            raise ValueError("diffusion_form='increasing-decreasing' raises NotImplementedError in "
                             "SiT; its working key is the misspelt 'inccreasing-decreasing'")
        if diffusion_form == "constant":
            raise ValueError("diffusion_form='constant' crashes SiT's sampler (sqrt of a Python "
                             f"float); use one of {path_lib.DIFFUSION_FORMS}")
        if diffusion_form not in path_lib.DIFFUSION_FORMS:
            raise ValueError(f"diffusion_form={diffusion_form!r}; use one of {path_lib.DIFFUSION_FORMS}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"last_step={last_step!r}; use one of {LAST_STEPS}")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps={num_steps!r}: SiT's num_steps counts grid points (the "
                             "last one is the last step), so it needs at least 2")
        if last_step is None:
            last_step_size = 0.0
        elif not 0 <= last_step_size < 1:
            raise ValueError(f"last_step_size={last_step_size!r}; use a value in [0, 1)")
        t0, t1 = self._interval(diffusion_form=diffusion_form, sde=True, reverse=False,
                                last_step_size=last_step_size)
        if not t0 < t1:
            raise ValueError(f"the SDE interval ({t0}, {t1}) is empty: SiT's SDE needs t0 < t1 "
                             "(lower last_step_size / sample_eps)")
        evaluated = {"the start": t0}
        if sampling_method == "Heun" or last_step in ("Mean", "Tweedie"):
            evaluated["the end"] = t1
        self._check_times("sample_sde", evaluated, sde=True, diffusion_form=diffusion_form)

        path = self.transport.path_sampler
        drift, score = self.drift, self.score
        diffusion = lambda x, t: path.compute_diffusion(x, t, diffusion_form, diffusion_norm)

        def run(z, model_fn, *, keep_trajectory, noise=None, noise_fn=None, key=None,
                **model_kwargs):
            dtype = _float_dtype(z)
            inputs, get = step_draws("noise", num_steps - 1, z.shape, given=noise,
                                     given_fn=noise_fn, key=key,
                                     draw=lambda k, s: jax.random.normal(k, s, dtype))
            grid = integrators.time_grid(t0, t1, num_steps, dtype)
            dt = jnp.asarray(grid[1] - grid[0], dtype)

            def sde_drift(x, t):
                return (drift(x, t, model_fn, **model_kwargs)
                        + diffusion(x, t) * score(x, t, model_fn, **model_kwargs))

            def body(x, xs):
                t, i, step_input = xs
                x = integrators.sde_step(sampling_method, sde_drift, diffusion, x, _batch_t(t, x),
                                         dt, get(step_input, i).astype(dtype))
                return x, (x if keep_trajectory else None)

            x, xs = jax.lax.scan(body, z, (jnp.asarray(grid[:-1]), jnp.arange(num_steps - 1),
                                           inputs))
            ts = _batch_t(t1, x)
            if last_step == "Mean":
                x = x + sde_drift(x, ts) * last_step_size
            elif last_step == "Euler":
                x = x + drift(x, ts, model_fn, **model_kwargs) * last_step_size
            elif last_step == "Tweedie":
                a = path.compute_alpha_t(ts)[0][0]
                s = path.compute_sigma_t(ts)[0][0]
                x = x / a + (s ** 2) / a * score(x, ts, model_fn, **model_kwargs)
            if not keep_trajectory:
                return x
            return jnp.concatenate([xs, x[None]], axis=0)

        return SamplingFn(run, num_steps, (t0, t1), stochastic=True)

