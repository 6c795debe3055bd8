"""Samplers and losses against closed forms and identities (no fixtures): Gaussian data with
its exact eps-predictor, DDIM(eta=1) == DDPM with the posterior variance, DPM-Solver++
convergence, one compiled loop, progress reports, gradients, and sharded == unsharded."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_rel, xla_flags
from udit_jax import diffusion

# Independent reference for the original 1000-step linear schedule.
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2), independently per element


def gaussian_eps_fn(var_value: float = -1.0):
    """Exact E[eps | x_t] for Gaussian data, plus a constant variance output channel.

    For x0 ~ N(MU, S^2): x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar) and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar).
    The model receives ORIGINAL timesteps, so abar is read from the 1000-step table.
    """
    def fn(x, t):
        abar = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, 1, 1, 1)
        eps = jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * MU) / (abar * S ** 2 + 1 - abar)
        return jnp.concatenate([eps, jnp.full_like(x, var_value)], axis=-1)
    return fn


def exact_ode_output(z, t_first: int):
    """Where the probability-flow ODE takes x at original step t_first to, reported as the x0
    prediction at step 0 (what DDIM / DPM-Solver return): the 1-D Gaussian flow map keeps the
    standardised value u = (x_t - sqrt(abar_t) MU) / sd_t."""
    sd = lambda a: np.sqrt(a * S ** 2 + 1 - a)
    u = (np.asarray(z, np.float64) - np.sqrt(ABAR[t_first]) * MU) / sd(ABAR[t_first])
    return MU + np.sqrt(ABAR[0]) * S ** 2 * u / sd(ABAR[0])


def toy_model_fn(x, t, y):
    """A nonlinear, label-dependent stand-in for a learned-variance model."""
    scale = 1.0 + 0.1 * y.astype(jnp.float32).reshape(-1, 1, 1, 1)
    eps = jnp.tanh(0.7 * x * scale + t.reshape(-1, 1, 1, 1) / 1000.0)
    v = jnp.sin(x + 0.3 * scale)
    return jnp.concatenate([eps, v], axis=-1)


def test_loop_is_one_compiled_loop():
    d = diffusion.create_diffusion("250")
    calls = []

    def model_fn(x, t, y):
        calls.append(1)
        return toy_model_fn(x, t, y)

    shape = (2, 4, 4, 3)
    jaxpr = jax.make_jaxpr(lambda key: d.p_sample_loop(model_fn, shape, key=key,
                                                      model_kwargs={"y": jnp.ones(2, jnp.int32)}))(
        jax.random.key(0))
    assert len(calls) == 1, f"the model was traced {len(calls)} times; the loop must be a lax loop"
    assert "scan" in str(jaxpr)


def test_ddim_eta_one_equals_ddpm_with_posterior_variance():
    # With sigma^2 = beta~_t, DDIM's update is algebraically the DDPM posterior mean plus
    # sqrt(beta~_t) noise; a learned-range output of v = -1 selects exactly beta~_t.
    d = diffusion.create_diffusion("20")
    shape = (2, 6, 6, 3)
    key_z, key_n = jax.random.split(jax.random.key(1))
    z = jax.random.normal(key_z, shape)
    step_noise = jax.random.normal(key_n, (d.num_timesteps,) + shape)
    y = jnp.array([1, 4])

    def model_fn(x, t, y):
        return toy_model_fn(x, t, y).at[..., 3:].set(-1.0)

    @jax.jit
    def run(z, step_noise, y):
        kw = dict(noise=z, clip_denoised=False, model_kwargs={"y": y})
        return (d.p_sample_loop(model_fn, shape, step_noise=step_noise, **kw),
                d.ddim_sample_loop(model_fn, shape, step_noise=step_noise, eta=1.0, **kw),
                d.ddim_sample_loop(model_fn, shape, **kw))

    ddpm, ddim, ddim0 = run(z, step_noise, y)
    assert_close_rel(ddim, ddpm, 1e-5, "ddim(eta=1) vs ddpm")
    assert float(jnp.max(jnp.abs(ddim0 - ddim))) > 1e-2  # eta matters


def _ode_errors(sampler: str, steps: int, z) -> float:
    d = diffusion.create_diffusion(str(steps))
    if sampler == "ddim":
        out = d.ddim_sample_loop(gaussian_eps_fn(), z.shape, noise=z, clip_denoised=False)
    else:
        out = d.dpm_solver_sample_loop(gaussian_eps_fn(), z.shape, noise=z, order=2)
    return float(np.max(np.abs(np.asarray(out, np.float64) - exact_ode_output(z, d.timestep_map[-1]))))


def test_dpm_solver_converges_to_exact_ode_solution():
    z = jax.random.normal(jax.random.key(2), (16, 4, 4, 1))
    dpm = {n: _ode_errors("dpm", n, z) for n in (10, 20, 40)}
    ddim = {n: _ode_errors("ddim", n, z) for n in (10, 20)}
    # Second order: halving the step roughly quarters the error, and it beats DDIM clearly.
    assert dpm[10] / dpm[20] > 3 and dpm[20] / dpm[40] > 3, dpm
    assert dpm[20] < ddim[20] / 2.5 and dpm[10] < ddim[10], (dpm, ddim)
    assert dpm[40] < 1e-2, dpm


def test_dpm_solver_first_order_is_ddim():
    d = diffusion.create_diffusion("15")
    z = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    y = jnp.array([0, 2])
    ddim = d.ddim_sample_loop(toy_model_fn, z.shape, noise=z, clip_denoised=True, model_kwargs={"y": y})
    dpm1 = d.dpm_solver_sample_loop(toy_model_fn, z.shape, noise=z, order=1, clip_denoised=True,
                                    model_kwargs={"y": y})
    assert_close_rel(dpm1, ddim, 1e-5, "dpm-solver order 1 vs ddim")


def test_ddpm_with_exact_eps_has_the_analytic_output_distribution():
    # Every step is affine in x_t plus independent noise, so the output is Gaussian with a
    # mean and variance that follow from the posterior coefficients (computed here from the
    # reference abar) and E[x0 | x_t] = MU + sqrt(a) S^2 (x_t - sqrt(a) MU) / (a S^2 + 1 - a).
    d = diffusion.create_diffusion("250")
    abar = ABAR[d.timestep_map]
    abar_prev = np.append(1.0, abar[:-1])
    mean, var = 0.0, 1.0  # x_T ~ N(0, 1)
    for t in range(d.num_timesteps - 1, -1, -1):
        a, ap = abar[t], abar_prev[t]
        beta = 1 - a / ap
        gain = np.sqrt(a) * S ** 2 / (a * S ** 2 + 1 - a)  # d E[x0|x_t] / d x_t
        c0, ct = np.sqrt(ap) * beta / (1 - a), np.sqrt(1 - beta) * (1 - ap) / (1 - a)
        slope, offset = c0 * gain + ct, c0 * (MU - gain * np.sqrt(a) * MU)
        mean, var = slope * mean + offset, slope ** 2 * var
        if t > 0:
            var += beta * (1 - ap) / (1 - a)  # v = -1: the posterior variance
    shape = (4096, 2, 2, 2)
    out = np.asarray(d.p_sample_loop(gaussian_eps_fn(-1.0), shape, key=jax.random.key(4),
                                     clip_denoised=False), np.float64).ravel()
    n = out.size
    assert abs(out.mean() - mean) < 5 * np.sqrt(var / n), (out.mean(), mean)
    assert abs(out.var() / var - 1) < 5 * np.sqrt(2 / n), (out.var(), var)
    assert abs(np.sqrt(var) - S) < 0.03 and abs(mean - MU) < 0.01  # and DDPM-250 is close to the data


def test_ddim_eta_and_keys_draw_independent_noise():
    # With eta = 1 and v = -1 on Gaussian data, samples from a key must be iid across steps:
    # reusing one noise draw for every step would give a visibly different variance.
    d = diffusion.create_diffusion("25")
    shape = (4096, 2, 2, 2)
    out = np.asarray(d.ddim_sample_loop(gaussian_eps_fn(-1.0), shape, key=jax.random.key(5),
                                        eta=1.0, clip_denoised=False)).ravel()
    ddpm = np.asarray(d.p_sample_loop(gaussian_eps_fn(-1.0), shape, key=jax.random.key(6),
                                      clip_denoised=False)).ravel()
    assert abs(out.var() / ddpm.var() - 1) < 0.05 and abs(out.mean() - ddpm.mean()) < 0.02


def test_progress_is_reported_from_the_compiled_loop(capfd):
    d = diffusion.create_diffusion("4")
    run = jax.jit(lambda z: d.ddim_sample_loop(gaussian_eps_fn(), z.shape, noise=z, progress=2))
    jax.block_until_ready(run(jnp.zeros((1, 2, 2, 1))))
    jax.effects_barrier()
    err = capfd.readouterr().err
    assert "ddim: 2/4 steps" in err and "ddim: 4/4 steps" in err and "1/4" not in err


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    d = diffusion.create_diffusion("")
    key = jax.random.key(7)
    x0 = jax.random.normal(key, (2, 4, 4, 3))
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 600])
    out = jax.random.normal(jax.random.fold_in(key, 2), x0.shape[:-1] + (6,))

    def term(name):
        return lambda o: jnp.sum(d.training_losses(lambda x, t: o, x0, t, noise=noise)[name])

    g_vb, g_mse = jax.jit(lambda o: (jax.grad(term("vb"))(o), jax.grad(term("mse"))(o)))(out)
    assert float(jnp.abs(g_vb[..., :3]).max()) == 0 and float(jnp.abs(g_vb[..., 3:]).max()) > 0
    assert float(jnp.abs(g_mse[..., 3:]).max()) == 0 and float(jnp.abs(g_mse[..., :3]).max()) > 0


def test_loss_variants_are_consistent():
    key = jax.random.key(8)
    x0 = jnp.clip(jax.random.normal(key, (2, 4, 4, 3)), -1, 1)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    out = jax.random.normal(jax.random.fold_in(key, 2), x0.shape[:-1] + (6,))
    t = jnp.array([0, 100])
    fn = lambda x, t: out
    base = diffusion.create_diffusion("250").training_losses(fn, x0, t, noise=noise)
    kl = diffusion.create_diffusion("250", use_kl=True).training_losses(fn, x0, t, noise=noise)
    assert set(kl) == {"loss"}
    np.testing.assert_allclose(kl["loss"], 250 * base["vb"], rtol=1e-6)
    rescaled = diffusion.create_diffusion("250", rescale_learned_sigmas=True).training_losses(
        fn, x0, t, noise=noise)
    np.testing.assert_allclose(rescaled["vb"], 0.25 * base["vb"], rtol=1e-6)
    np.testing.assert_allclose(rescaled["mse"], np.mean((noise - out[..., :3]) ** 2, axis=(1, 2, 3)), rtol=1e-6)
    xs = diffusion.create_diffusion("250", predict_xstart=True).training_losses(fn, x0, t, noise=noise)
    np.testing.assert_allclose(xs["mse"], np.mean((x0 - out[..., :3]) ** 2, axis=(1, 2, 3)), rtol=1e-6)
    fixed = diffusion.create_diffusion("250", learn_sigma=False).training_losses(
        lambda x, t: out[..., :3], x0, t, noise=noise)
    assert set(fixed) == {"loss", "mse"}
    np.testing.assert_allclose(fixed["loss"], base["mse"], rtol=1e-6)


def test_fixed_variances():
    x = jnp.zeros((3, 2, 2, 1))
    t = jnp.array([0, 1, 9])
    fn = lambda x, t: jnp.zeros_like(x)
    large = diffusion.create_diffusion("10", learn_sigma=False)
    small = diffusion.create_diffusion("10", learn_sigma=False, sigma_small=True)
    v_large = large.p_mean_variance(fn, x, t)["variance"][:, 0, 0, 0]
    v_small = small.p_mean_variance(fn, x, t)["variance"][:, 0, 0, 0]
    b, pv = large.betas, large.posterior_variance
    # fixed large is beta_t, except beta~_1 at t = 0 (a better decoder likelihood upstream)
    np.testing.assert_allclose(v_large, [pv[1], b[1], b[9]], rtol=1e-6)
    np.testing.assert_allclose(v_small, [pv[0], pv[1], pv[9]], rtol=1e-6)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from udit_jax import diffusion, parallel
    assert jax.device_count() == 8, jax.devices()

    def model_fn(x, t, y):
        scale = 1.0 + 0.1 * y.astype(jnp.float32).reshape(-1, 1, 1, 1)
        eps = jnp.tanh(0.7 * x * scale + t.reshape(-1, 1, 1, 1) / 1000.0)
        return jnp.concatenate([eps, jnp.sin(x + 0.3 * scale)], axis=-1)

    mesh = parallel.make_mesh(data=4, fsdp=2)
    d = diffusion.create_diffusion("12")
    shape = (16, 4, 4, 3)
    z = jax.random.normal(jax.random.key(0), shape)
    y = jnp.arange(16) % 5
    x0 = jnp.clip(jax.random.normal(jax.random.key(1), shape), -1, 1)
    t = jnp.arange(16) * 7 % d.num_timesteps

    def run(z, y, x0, t, key):
        kw = {"y": y}
        return {
            "ddpm": d.p_sample_loop(model_fn, shape, noise=z, key=key, clip_denoised=False, model_kwargs=kw),
            "ddim": d.ddim_sample_loop(model_fn, shape, key=key, eta=0.5, model_kwargs=kw),
            "dpm": d.dpm_solver_sample_loop(model_fn, shape, noise=z, model_kwargs=kw),
            "loss": d.training_losses(model_fn, x0, t, key=key, model_kwargs=kw)["loss"],
        }

    key = jax.random.key(2)
    single = jax.jit(run)(z, y, x0, t, key)
    sharded_args = [parallel.shard_batch(mesh, a) for a in (z, y, x0, t)]
    sharded = jax.jit(run)(*sharded_args, key)
    for name in single:
        a, b = np.asarray(single[name]), np.asarray(sharded[name])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
        assert float(np.abs(a).max()) > 0, name
    n_shards = len({str(s.index) for s in sharded["ddpm"].addressable_shards})
    assert n_shards == 8, f"ddpm output is not sharded over the batch: {n_shards} distinct shards"
    print("SHARDED-OK")
""")


def test_sharded_batch_matches_unsharded():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert "SHARDED-OK" in result.stdout, result.stdout + result.stderr
