"""Time grids and fixed-step integrators of SiT's samplers, each one `lax.scan`.

The ODE steps are torchdiffeq's fixed-grid solvers (what SiT's `ode` calls) with their
operation order; the adaptive dopri5 is JAX's Dormand-Prince (jax.experimental.ode, a
while_loop; same method and tolerances as torchdiffeq's, not its exact step choices). The SDE
steps are SiT's Euler-Maruyama and Heun. States may be pytrees
(the likelihood ODE integrates (x, log-density change) together).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

FIXED_STEP_ODE_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE_ODE_METHODS = ("dopri5",)
ODE_METHODS = FIXED_STEP_ODE_METHODS + ADAPTIVE_ODE_METHODS
SDE_METHODS = ("Euler", "Heun")
# Solvers that evaluate the drift at a step's end point t_{i+1}.
ODE_METHODS_AT_END = ("heun2", "rk4", "dopri5")
# Error control of the adaptive solver: at most this many steps between two grid points.
ADAPTIVE_MAX_STEPS = 4096
# Drift evaluations per step.
ODE_STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


def time_grid(start: float, end: float, n: int, dtype) -> np.ndarray:
    """torch.linspace(start, end, n) in `dtype`, bit for bit (computed on the host).

    torch (CPU) rounds start/end to dtype, computes step = (end - start) / (n - 1) in dtype
    and returns start + step * i for i < n // 2 and end - step * (n - 1 - i) otherwise, each
    multiply-add rounded once (FMA). np/jnp.linspace differ from it by up to an ulp.
    """
    if n < 2:
        raise ValueError(f"a time grid needs at least 2 points, got num_steps={n}")
    dtype = np.dtype(dtype)
    start, end = dtype.type(start), dtype.type(end)
    step = (end - start) / dtype.type(n - 1)
    s, e, h = Fraction(float(start)), Fraction(float(end)), Fraction(float(step))
    exact = [s + h * i if i < n // 2 else e - h * (n - 1 - i) for i in range(n)]
    if dtype == np.float32:
        # Through float64 (exact products, one rounding in the sum): the recipe that matches
        # torch's float32 kernel.
        return np.array([float(v) for v in exact], np.float64).astype(np.float32)
    return np.array([float(v) for v in exact], dtype)


def _axpy(y, dt, k, c=None):
    """y + dt * k (* c), leaf by leaf, in that order."""
    if c is None:
        return jax.tree.map(lambda a, b: a + dt * b, y, k)
    return jax.tree.map(lambda a, b: a + dt * b * c, y, k)


def _lin(*terms):
    """Sum of k * c over (k, c) pairs, left to right, leaf by leaf."""
    def combine(*leaves):
        acc = leaves[0] * terms[0][1]
        for leaf, (_, c) in zip(leaves[1:], terms[1:]):
            acc = acc + leaf * c
        return acc
    return jax.tree.map(combine, *(k for k, _ in terms))


def ode_step(method: str, f: Callable, t0, t1, y):
    """One torchdiffeq fixed-grid step from t0 to t1 (scalars; t1 < t0 integrates backwards).

    f(t, y) is the vector field at scalar time t. Returns y(t1).
    """
    dt = t1 - t0
    k1 = f(t0, y)
    if method == "euler":
        dy = jax.tree.map(lambda k: dt * k, k1)
    elif method == "midpoint":
        half_dt = 0.5 * dt
        y_mid = jax.tree.map(lambda a, k: a + k * half_dt, y, k1)
        dy = jax.tree.map(lambda k: dt * k, f(t0 + half_dt, y_mid))
    elif method == "heun2":
        k2 = f(t0 + dt * 1.0, _axpy(y, dt, k1, 1.0))
        dy = jax.tree.map(lambda s: dt * s, _lin((k1, 0.5), (k2, 0.5)))
    elif method == "heun3":
        k2 = f(t0 + dt * (1 / 3), _axpy(y, dt, k1, 1 / 3))
        k3 = f(t0 + dt * (2 / 3), _axpy(y, dt, _lin((k1, 0.0), (k2, 2 / 3))))
        dy = jax.tree.map(lambda s: dt * s, _lin((k1, 0.25), (k2, 0.0), (k3, 0.75)))
    elif method == "rk4":  # torchdiffeq's rk4: the 3/8 rule
        k2 = f(t0 + dt * (1 / 3), _axpy(y, dt, k1, 1 / 3))
        k3 = f(t0 + dt * (2 / 3), _axpy(y, dt, jax.tree.map(lambda b, a: b - a * (1 / 3), k2, k1)))
        k4 = f(t1, _axpy(y, dt, jax.tree.map(lambda a, b, c: a - b + c, k1, k2, k3)))
        dy = jax.tree.map(lambda a, b, c, d: (a + 3 * (b + c) + d) * dt * 0.125, k1, k2, k3, k4)
    else:
        raise ValueError(f"sampling_method={method!r}; use one of {ODE_METHODS}")
    return jax.tree.map(jnp.add, y, dy)


def integrate_ode(method: str, f: Callable, y0, grid, *, step_inputs=None,
                  keep_trajectory: bool = True):
    """Integrates dy/dt = f(t, y) over the points of `grid` [N] (one step per interval).

    With step_inputs (a pytree with leading axis N - 1), f is called as
    f(t, y, step_input, stage): that step's input and the index of the evaluation within the
    step, in the solver's order (the likelihood ODE feeds one probe per evaluation this way).
    Returns the states at every grid point, [N, ...] per leaf (y0 first), or only the last.
    """
    grid = jnp.asarray(grid)

    def body(y, xs):
        t0, t1, step_input = xs
        if step_inputs is None:
            field = f
        else:
            stages = iter(range(ODE_STAGES[method]))
            field = lambda t, y_: f(t, y_, step_input, next(stages))
        y = ode_step(method, field, t0, t1, y)
        return y, (y if keep_trajectory else None)

    y, traj = jax.lax.scan(body, y0, (grid[:-1], grid[1:], step_inputs))
    if not keep_trajectory:
        return y
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b], axis=0), y0, traj)


def integrate_adaptive(f: Callable, y0, grid, *, rtol: float, atol: float,
                       keep_trajectory: bool = True):
    """dopri5 with error control (rtol, atol) through the points of `grid` [N], monotone.

    A decreasing grid is integrated in negated time, as torchdiffeq does. Returns the
    states at every grid point, [N, ...] per leaf (y0 first), or only the last.
    """
    from jax.experimental.ode import odeint
    grid = np.asarray(grid)   # a host array: the direction is static
    sign = 1.0 if grid[-1] > grid[0] else -1.0
    if not keep_trajectory:   # steps do not depend on the output points: keep only the ends
        grid = grid[[0, -1]]

    def field(y, s):
        return jax.tree.map(lambda d: sign * d, f(sign * s, y))

    traj = odeint(field, y0, jnp.asarray(sign * grid), rtol=rtol, atol=atol, mxstep=ADAPTIVE_MAX_STEPS)
    return traj if keep_trajectory else jax.tree.map(lambda a: a[-1], traj)


def sde_step(method: str, sde_drift: Callable, diffusion: Callable, x, t, dt, w):
    """One SiT SDE step at times t [B] with step dt (scalar) and standard normal w like x.

    sde_drift(x, t) is the drift, diffusion(x, t) the D with noise sqrt(2 D) dW.
    """
    dw = w * jnp.sqrt(dt)
    if method == "Euler":
        mean_x = x + sde_drift(x, t) * dt
        return mean_x + jnp.sqrt(2 * diffusion(x, t)) * dw
    if method == "Heun":
        xhat = x + jnp.sqrt(2 * diffusion(x, t)) * dw
        k1 = sde_drift(xhat, t)
        xp = xhat + dt * k1
        k2 = sde_drift(xp, t + dt)
        return xhat + 0.5 * dt * (k1 + k2)
    raise ValueError(f"sampling_method={method!r}; use one of {SDE_METHODS}")
