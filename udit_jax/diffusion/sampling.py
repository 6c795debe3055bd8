"""Sampling loops as single XLA loops: DDPM (ancestral) and DDIM, plus the shared driver.

Every loop is one `lax.scan` over the steps t = S-1 ... 0 of a (respaced) process, so it jits
to one compiled loop whatever S is. Random draws are explicit: pass the start noise and the
per-step noise as arrays (to replay a reference trajectory), a per-step noise function
(t -> noise, e.g. each image's noise from its own key), or a key that draws them.
Progress is reported from inside the compiled loop with `jax.debug.callback`.
"""

from __future__ import annotations

import operator
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def noise_like(x, noise: jax.Array | None, key: jax.Array | None, what: str) -> jax.Array:
    """`noise` if given (checked against x's shape), else standard normal drawn from `key`.

    x: an array or jax.ShapeDtypeStruct giving the shape.
    """
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != x.shape:
            raise ValueError(f"{what}: noise has shape {noise.shape}, expected {x.shape}")
        return noise
    if key is None:
        raise ValueError(f"{what} needs random noise: pass noise=<array> or key=<PRNG key>")
    return jax.random.normal(key, x.shape, jnp.float32)


def _check_shape(shape) -> tuple[int, ...]:
    try:
        return tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a tuple of ints such as (B, H, W, C), got {shape!r}") from None


def initial_and_step_noise(shape, num_steps: int, *, noise, step_noise, key, needs_step_noise: bool,
                           what: str, step_noise_fn: Callable | None = None):
    """The start x_T and a per-step noise source for a loop.

    Returns (x_T [shape], step_inputs, to_noise): step_inputs has a leading axis of num_steps
    (the stored noise, or one key per step, or None) and to_noise(step_input, t) gives the
    noise of step t (or None when the loop needs none). step_noise_fn(t) -> [shape], when
    given, is that noise (a hook for callers that key noise per image, not per batch). Keys are split so that the start noise
    and the step noise are independent; the per-step noise is drawn inside the loop, so no
    [S, B, ...] array is materialised.
    """
    shape = _check_shape(shape)
    init_key = step_key = None
    if key is not None:
        init_key, step_key = jax.random.split(key)
    if noise is None and key is None:
        raise ValueError(f"{what} needs its start noise: pass noise=<array of shape {shape}> or key=")
    x_t = noise_like(jax.ShapeDtypeStruct(shape, jnp.float32), noise, init_key, what)

    if not needs_step_noise:
        return x_t, None, lambda _, t: None
    if (step_noise is not None) + (step_noise_fn is not None) > 1:
        raise ValueError(f"{what}: pass step_noise or step_noise_fn, not both")
    if step_noise_fn is not None:
        return x_t, None, lambda _, t: step_noise_fn(t)
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise, jnp.float32)
        if step_noise.shape != (num_steps,) + shape:
            raise ValueError(f"{what}: step_noise has shape {step_noise.shape}, expected "
                             f"{(num_steps,) + shape} (one noise array per step, in sampling order)")
        return x_t, step_noise, lambda n, t: n
    if step_key is None:
        raise ValueError(f"{what} draws noise at every step: pass step_noise=<array of shape "
                         f"{(num_steps,) + shape}> or key=")
    keys = jax.random.split(step_key, num_steps)
    return x_t, keys, lambda k, t: jax.random.normal(k, shape, jnp.float32)


def _report_progress(done: jax.Array, total: int, every: int, label: str) -> None:
    start = {}  # wall time and step of this run's first report (the callback outlives one run)

    def show(d):
        d, now = int(d), time.perf_counter()
        if jax.process_index() != 0:
            return
        if not start or d <= start["step"]:
            start.update(time=now, step=d)
            eta = ""
        else:
            rate = (d - start["step"]) / (now - start["time"])
            eta = f", {rate:.2f} steps/s, {(total - d) / rate:.0f} s left"
        print(f"{label}: {d}/{total} steps{eta}", file=sys.stderr, flush=True)

    jax.lax.cond((done % every == 0) | (done == total),
                 lambda: jax.debug.callback(show, done), lambda: None)


def run_steps(step: Callable, state: Any, num_steps: int, step_inputs: Any, *,
              progress: int | None, label: str, return_trajectory: bool):
    """Runs step(state, t, step_input) -> (state, {"sample", "pred_xstart"}) for t = S-1..0.

    Returns (final state, trajectory) where the trajectory stacks each step's outputs
    ([S, ...]) when return_trajectory, else None.
    """
    if progress is not None and (not isinstance(progress, int) or progress < 1):
        raise ValueError(f"progress must be None or a positive step interval, got {progress!r}")
    ts = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)

    def body(carry, xs):
        t, step_input = xs
        carry, out = step(carry, t, step_input)
        if progress:
            _report_progress(num_steps - t, num_steps, progress, label)
        return carry, (out if return_trajectory else None)

    return jax.lax.scan(body, state, (ts, step_inputs))


def _batch_t(t: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), t, jnp.int32)


def p_sample_loop(diffusion, model_fn, shape, *, noise, step_noise, key, clip_denoised, denoised_fn,
                  model_kwargs, progress, return_trajectory, step_noise_fn=None):
    """See GaussianDiffusion.p_sample_loop."""
    x_t, step_inputs, to_noise = initial_and_step_noise(
        shape, diffusion.num_timesteps, noise=noise, step_noise=step_noise, key=key,
        needs_step_noise=True, what="p_sample_loop", step_noise_fn=step_noise_fn)

    def step(x, t, step_input):
        out = diffusion.p_sample(model_fn, x, _batch_t(t, x.shape[0]), noise=to_noise(step_input, t),
                                 clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs)
        return out["sample"], out

    x, trajectory = run_steps(step, x_t, diffusion.num_timesteps, step_inputs, progress=progress,
                              label="ddpm", return_trajectory=return_trajectory)
    return (x, trajectory) if return_trajectory else x


def ddim_sample_loop(diffusion, model_fn, shape, *, noise, step_noise, key, eta, clip_denoised,
                     denoised_fn, model_kwargs, progress, return_trajectory, step_noise_fn=None):
    """See GaussianDiffusion.ddim_sample_loop."""
    x_t, step_inputs, to_noise = initial_and_step_noise(
        shape, diffusion.num_timesteps, noise=noise, step_noise=step_noise, key=key,
        needs_step_noise=eta != 0, what="ddim_sample_loop", step_noise_fn=step_noise_fn)

    def step(x, t, step_input):
        out = diffusion.ddim_sample(model_fn, x, _batch_t(t, x.shape[0]), eta=eta,
                                    noise=to_noise(step_input, t), clip_denoised=clip_denoised,
                                    denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        return out["sample"], out

    x, trajectory = run_steps(step, x_t, diffusion.num_timesteps, step_inputs, progress=progress,
                              label="ddim", return_trajectory=return_trajectory)
    return (x, trajectory) if return_trajectory else x
