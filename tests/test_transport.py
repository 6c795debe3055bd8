"""Transport objective, timestep sampling, min-SNR weighting and the guidance interval against
closed forms; refusals of settings SiT cannot run; config switches and the train step.

(Parity with the official SiT code is in test_transport_parity.py.)
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from udit_jax import config as config_lib
from udit_jax import sampler as sampler_lib
from udit_jax.diffusion import create_diffusion, guidance, objective, transport
from udit_jax.diffusion.timesteps import TimestepSampling
from udit_jax.diffusion.weighting import min_snr_weight
from udit_jax.models.layers import guided_output

# ---- timestep sampling ----------------------------------------------------------------------

N_DRAWS = 200_000
KS_LIMIT = 1.63 / math.sqrt(N_DRAWS)   # the KS statistic's 1% critical value


def test_logit_normal_matches_its_distribution():
    mean, std = 0.4, 0.8
    ts = TimestepSampling("logit_normal", mean, std)
    key = jax.random.PRNGKey(0)
    u = np.asarray(ts.noise_level(key, (N_DRAWS,)), np.float64)
    assert 0 < u.min() and u.max() < 1
    logits = special.logit(u)
    assert abs(logits.mean() - mean) < 5 * std / math.sqrt(N_DRAWS)
    assert abs(logits.std() - std) < 0.01 * std
    ks = stats.kstest(u, lambda v: stats.norm.cdf((special.logit(v) - mean) / std)).statistic
    assert ks < KS_LIMIT
    # SiT's data level is 1 - noise level: logit-normal with the mean negated.
    d = np.asarray(ts.data_level(key, (N_DRAWS,)), np.float64)
    assert stats.kstest(d, lambda v: stats.norm.cdf((special.logit(v) + mean) / std)).statistic < KS_LIMIT
    # DDPM steps: floor(u T), so P(t <= k) = F((k + 1) / T).
    steps = np.asarray(ts.ddpm_steps(key, (N_DRAWS,), 1000))
    assert steps.min() >= 0 and steps.max() <= 999
    grid = np.arange(0, 1000, 37)
    empirical = np.searchsorted(np.sort(steps), grid, side="right") / N_DRAWS
    exact = stats.norm.cdf((special.logit((grid + 1) / 1000) - mean) / std)
    assert np.max(np.abs(empirical - exact)) < KS_LIMIT


def test_uniform_sampling_keeps_the_official_draws():
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(TimestepSampling().ddpm_steps(key, (64,), 1000),
                                  jax.random.randint(key, (64,), 0, 1000))
    u = np.asarray(TimestepSampling().data_level(key, (N_DRAWS,)))
    assert stats.kstest(u, "uniform").statistic < KS_LIMIT


def test_bad_timestep_sampling_is_refused():
    with pytest.raises(ValueError, match="logit_normal"):
        TimestepSampling("lognormal")
    with pytest.raises(ValueError, match="std > 0"):
        TimestepSampling("logit_normal", 0.0, 0.0)


# ---- min-SNR-gamma ----------------------------------------------------------------------------

def test_min_snr_ddpm_weights_the_mse_by_the_formula():
    gamma = 5.0
    d = create_diffusion("", learn_sigma=True)
    obj = objective.DDPMObjective(d, TimestepSampling(), gamma)
    t = jnp.asarray([0, 10, 100, 300, 500, 999])
    x0 = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 2))
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    model_fn = lambda x, tt, y: jnp.concatenate([0.5 * x, 0.1 * x], -1)
    terms = obj.training_losses(model_fn, x0, t, noise=noise, model_kwargs={"y": t})
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
    snr = abar / (1 - abar)
    expected = np.minimum(snr, gamma) / snr * terms["mse"] + terms["vb"]
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-5)
    assert np.asarray(terms["loss"])[0] < np.asarray(terms["mse"] + terms["vb"])[0]  # high SNR: damped


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
def test_min_snr_transport_velocity_is_min_snr_on_the_implied_data(path_type):
    """w * velocity MSE == min(SNR, gamma) * MSE of the data x1 the velocity implies."""
    gamma = 3.0
    tr = transport.create_transport(path_type, "velocity")
    obj = objective.TransportObjective(tr, TimestepSampling(), gamma)
    path = tr.path_sampler
    t = jnp.asarray([0.05, 0.2, 0.5, 0.7, 0.9, 0.97])
    x1 = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 3))
    x0 = jax.random.normal(jax.random.PRNGKey(1), x1.shape)
    _, xt, ut = path.plan(t, x0, x1)
    v_hat = ut + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x1.shape)
    te = t[:, None, None, None]
    a, da = path.compute_alpha_t(te)
    s, ds = path.compute_sigma_t(te)
    x1_hat = (ds * xt - s * v_hat) / (ds * a - s * da)     # solves x_t, u_t for x1
    w = obj.min_snr_weight(t)
    lhs = w * transport.mean_flat((v_hat - ut) ** 2)
    snr = np.asarray((a / s) ** 2).reshape(-1)
    rhs = np.minimum(snr, gamma) * transport.mean_flat((x1_hat - x1) ** 2)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
    if path_type == "Linear":
        np.testing.assert_allclose(w, np.minimum(t ** 2, gamma * (1 - t) ** 2), rtol=1e-6)


def test_min_snr_transport_noise_and_weights_at_the_ends():
    tr = transport.create_transport("Linear", "noise")
    obj = objective.TransportObjective(tr, TimestepSampling(), 5.0)
    t = jnp.asarray([0.01, 0.5, 0.99])
    snr = (np.asarray(t) / (1 - np.asarray(t))) ** 2
    np.testing.assert_allclose(obj.min_snr_weight(t), np.minimum(snr, 5.0) / snr, rtol=1e-5)
    ends = min_snr_weight(jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 0.0]), 5.0, "velocity",
                          1.0, -1.0)
    np.testing.assert_array_equal(ends, [0.0, 0.0])   # finite at SNR 0 and infinity
    with pytest.raises(ValueError, match="loss_weight"):
        objective.TransportObjective(transport.create_transport("Linear", "noise", "likelihood"),
                                     TimestepSampling(), 5.0)


# ---- guidance interval ----------------------------------------------------------------------

def toy_cfg_model(channels_guided=None):
    """forward_with_cfg of a toy model whose output depends on x, t and y."""
    def model(x, t, y):
        return jnp.sin(x * (1 + y[:, None, None, None])) + t[:, None, None, None]

    def forward_with_cfg(x, t, y, cfg_scale):
        half = x[: x.shape[0] // 2]
        return guided_output(model(jnp.concatenate([half, half]), t, y), cfg_scale, channels_guided)

    return model, forward_with_cfg


def test_guidance_interval_full_is_plain_guidance_and_empty_is_none():
    _, fwd = toy_cfg_model()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))
    y = jnp.asarray([1, 2, 5, 5])
    for t, level in ((jnp.asarray([0.0, 1.0, 0.0, 1.0]), guidance.transport_noise_level),
                     (jnp.asarray([0, 999, 0, 999]), guidance.ddpm_noise_level(1000))):
        full = guidance.with_guidance_interval(fwd, (0.0, 1.0), level)
        np.testing.assert_array_equal(full(x, t, y, 4.0), fwd(x, t, y, 4.0))
        empty = guidance.with_guidance_interval(fwd, (1.0, 0.0), level)
        np.testing.assert_array_equal(empty(x, t, y, 4.0), fwd(x, t, y, 1.0))


def test_guidance_interval_guides_only_inside():
    model, fwd = toy_cfg_model()
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 3))
    x = jnp.concatenate([x[:3], x[:3]])
    t = jnp.asarray([0.1, 0.5, 0.9] * 2)                  # SiT time: noise levels 0.9, 0.5, 0.1
    y = jnp.asarray([1, 2, 0, 5, 5, 5])
    out = guidance.with_guidance_interval(fwd, (0.3, 0.7), guidance.transport_noise_level)(
        x, t, y, 4.0)
    guided, plain = fwd(x, t, y, 4.0), model(x, t, y)
    np.testing.assert_allclose(out[1], guided[1], rtol=1e-6)
    for row in (0, 2):
        np.testing.assert_allclose(out[row], plain[row], rtol=1e-6, atol=1e-6)


def test_guidance_interval_in_both_objectives_samplers():
    """A whole ODE (transport) and DDIM (ddpm) run: interval (0, 1) == plain guidance."""
    _, fwd = toy_cfg_model()
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 3))
    z = jnp.concatenate([z, z])
    kw = {"y": jnp.asarray([1, 2, 5, 5]), "cfg_scale": 3.0}
    ode = transport.Sampler(transport.create_transport()).sample_ode(num_steps=6)
    full = guidance.with_guidance_interval(fwd, (0, 1), guidance.transport_noise_level)
    np.testing.assert_array_equal(ode.final(z, full, **kw), ode.final(z, fwd, **kw))
    empty = guidance.with_guidance_interval(fwd, (1, 0), guidance.transport_noise_level)
    np.testing.assert_array_equal(ode.final(z, empty, **kw), ode.final(z, fwd, **dict(kw, cfg_scale=1.0)))
    d = create_diffusion("ddim5", learn_sigma=False)
    ddim = lambda f: d.ddim_sample_loop(f, z.shape, noise=z, clip_denoised=False, model_kwargs=kw)
    full = guidance.with_guidance_interval(fwd, (0, 1), guidance.ddpm_noise_level(1000))
    np.testing.assert_array_equal(ddim(full), ddim(fwd))


def test_guidance_interval_is_checked():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        guidance.check_interval((0.2, 1.5))
    with pytest.raises(ValueError, match="two noise levels"):
        guidance.check_interval(0.5)


# ---- the ODE on Gaussian data with the exact velocity ----------------------------------------

def gaussian_velocity(mu, s):
    """Exact velocity of the Linear path for data N(mu, s^2 I): x_t ~ N(t mu, t^2 s^2 + (1-t)^2)."""
    def v(x, t):
        t = t[:, None, None, None]
        var = t ** 2 * s ** 2 + (1 - t) ** 2
        return mu + (t * s ** 2 - (1 - t)) / var * (x - t * mu)
    return v


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun2", 2),
                                           ("heun3", 3), ("rk4", 4)])
def test_ode_converges_to_the_exact_flow(method, order):
    mu, s = 1.5, 0.6
    sampler = transport.Sampler(transport.create_transport("Linear", "velocity"))
    errors = []
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 2), jnp.float64)
        exact = mu + s * z                                 # the flow maps z to mu + s z
        for steps in (5, 9, 17, 33, 65):                  # grid points: 4 ... 64 steps
            fn = sampler.sample_ode(sampling_method=method, num_steps=steps)
            x = jax.jit(lambda z: fn.final(z, gaussian_velocity(mu, s)))(z)
            errors.append(float(jnp.max(jnp.abs(x - exact))))
    rates = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
    assert np.all(np.diff(errors) < 0), errors
    # The method's order (the mean over the last 3 halvings: rk4's errors wobble around h^4).
    assert np.mean(rates[-3:]) > order - 0.3, (errors, rates)


@pytest.mark.parametrize("path_type, reverse", [("Linear", False), ("GVP", True)])
def test_adaptive_dopri5_meets_its_tolerance(path_type, reverse):
    """dopri5 (jit, while_loop) on the exact Gaussian flow; reverse runs data -> noise."""
    mu, s = 1.5, 0.6
    tr = transport.create_transport(path_type, "velocity")
    path = tr.path_sampler

    def velocity(x, t):   # exact for data N(mu, s^2): x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2)
        t = t[:, None, None, None]
        (a, da), (g, dg) = path.compute_alpha_t(t), path.compute_sigma_t(t)
        var = a ** 2 * s ** 2 + g ** 2
        return da * mu + (a * da * s ** 2 + g * dg) / var * (x - a * mu)

    fn = transport.Sampler(tr).sample_ode(sampling_method="dopri5", num_steps=5, atol=1e-7,
                                          rtol=1e-7, reverse=reverse)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 3))
    start, end = (mu + s * z, z) if reverse else (z, mu + s * z)
    traj = jax.jit(lambda z: fn(z, velocity))(start)
    assert traj.shape == (5,) + z.shape
    np.testing.assert_array_equal(traj[0], start)
    np.testing.assert_allclose(traj[-1], end, atol=2e-5)
    np.testing.assert_allclose(jax.jit(lambda z: fn.final(z, velocity))(start), traj[-1], atol=1e-6)


def test_likelihood_of_gaussian_data_is_exact():
    """The Jacobian of the Gaussian velocity is a multiple of I, so Hutchinson's estimate is
    exact and the ODE's log-likelihood converges to the closed form; z = (x - mu) / s."""
    mu, s = 0.5, 0.7
    fn = transport.Sampler(transport.create_transport()).sample_ode_likelihood(
        sampling_method="rk4", num_steps=41)
    with jax.enable_x64(True):
        x = mu + s * jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 2), jnp.float64)
        logp, z = fn(x, lambda x, t: gaussian_velocity(mu, s)(x, t), key=jax.random.PRNGKey(1))
        exact = stats.norm.logpdf(np.asarray(x), mu, s).reshape(3, -1).sum(1)
        np.testing.assert_allclose(logp, exact, rtol=1e-7)
        np.testing.assert_allclose(z, (x - mu) / s, atol=1e-7)


def test_trajectory_final_and_sample_loop_agree():
    fn = transport.Sampler(transport.create_transport("GVP", "velocity")).sample_sde(
        sampling_method="Heun", diffusion_form="sigma", num_steps=5)
    v = gaussian_velocity(0.5, 0.5)
    model_fn = lambda x, t: v(x, t)
    key = jax.random.PRNGKey(1)
    k_z, k_steps = jax.random.split(key)
    z = jax.random.normal(k_z, (2, 2, 2, 1))
    traj = fn(z, model_fn, key=k_steps)
    assert traj.shape == (5, 2, 2, 2, 1)
    np.testing.assert_allclose(fn.final(z, model_fn, key=k_steps), traj[-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(transport.sample_loop(fn, model_fn, z.shape, key=key), traj[-1],
                               rtol=1e-6, atol=1e-6)
    noise = jax.random.normal(jax.random.PRNGKey(2), (4,) + z.shape)
    np.testing.assert_array_equal(fn(z, model_fn, noise_fn=lambda i: noise[i]),
                                  fn(z, model_fn, noise=noise))


def test_learned_sigma_outputs_use_the_first_channels():
    tr = transport.create_transport("Linear", "velocity")
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 4))
    kw = dict(u=jnp.asarray([0.1, 0.5, 0.9]), noise=jnp.ones_like(x1))
    half = lambda x, t: 0.7 * x
    both = lambda x, t: jnp.concatenate([0.7 * x, 100 + x], -1)
    np.testing.assert_array_equal(tr.training_losses(both, x1, **kw)["loss"],
                                  tr.training_losses(half, x1, **kw)["loss"])
    with pytest.raises(ValueError, match="output channels"):
        tr.training_losses(lambda x, t: x[..., :3], x1, **kw)


# ---- settings SiT cannot run are refused -----------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: transport.create_transport("Linear", "eps"), "prediction"),
    (lambda: transport.create_transport("Cosine"), "path_type"),
    (lambda: transport.create_transport(loss_weight="snr"), "loss_weight"),
    (lambda: transport.Sampler(transport.create_transport()).sample_sde(diffusion_form="SBDM"),
     "SBDM"),
    (lambda: transport.Sampler(transport.create_transport()).sample_sde(
        diffusion_form="constant"), "crashes"),
    (lambda: transport.Sampler(transport.create_transport()).sample_sde(
        diffusion_form="increasing-decreasing"), "inccreasing-decreasing"),
    (lambda: transport.Sampler(transport.create_transport("GVP")).sample_sde(
        sampling_method="Heun", diffusion_form="sigma", last_step=None), "velocity-to-score"),
    (lambda: transport.Sampler(transport.create_transport()).sample_sde(
        diffusion_form="sigma", last_step="Tweedie", last_step_size=0.0), "velocity-to-score"),
    (lambda: transport.Sampler(transport.create_transport("VP", "noise")).sample_ode(
        reverse=True), "noise-to-score"),
    (lambda: transport.Sampler(transport.create_transport("VP", "score")).sample_ode_likelihood(),
     None),
    (lambda: transport.Sampler(transport.create_transport("VP", "noise")).sample_ode_likelihood(),
     "noise-to-score"),
    (lambda: transport.Sampler(transport.create_transport("Linear", "noise", None, 1e-3)).sample_ode(),
     "sample_eps=None"),
    (lambda: transport.Sampler(transport.create_transport()).sample_ode_likelihood(
        sampling_method="dopri5"), "fixed-step"),
    (lambda: transport.Sampler(transport.create_transport()).sample_ode(sampling_method="rk45"),
     "sampling_method"),
    (lambda: transport.Sampler(transport.create_transport()).sample_ode(num_steps=1), "grid points"),
])
def test_settings_sit_cannot_run_are_refused(make, message):
    if message is None:      # allowed: VP score stays finite at t = 1 (no 1/sigma)
        make()
        return
    with pytest.raises(ValueError, match=message):
        make()


def test_neighbours_of_refused_settings_run_finite():
    """Euler without a last step never evaluates t = 1, so velocity on Linear is fine there."""
    fn = transport.Sampler(transport.create_transport()).sample_sde(
        sampling_method="Euler", diffusion_form="sigma", last_step=None, num_steps=6)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 1))
    out = fn(z, lambda x, t: gaussian_velocity(0.0, 1.0)(x, t), key=jax.random.PRNGKey(1))
    assert np.all(np.isfinite(out))


# ---- config switches and the train step ------------------------------------------------------

def transport_config(**overrides):
    config = config_lib.base_config()
    config.update_from_flattened_dict({"objective": "transport", "sample.sampler": "ode",
                                       "sample.steps": "50", **overrides})
    return config


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "flow"}, "objective='flow'"),
    ({"sample.sampler": "ddpm"}, "sample.sampler='ddpm' samples 'ddpm' models"),
    ({"eval.sampler": "ddim"}, "eval.sampler='ddim'"),
    ({"transport.path_type": "linear"}, "config.transport: path_type"),
    ({"sample.sampler": "sde", "transport.diffusion_form": "SBDM"}, "SBDM"),
    ({"sample.sampler": "sde", "transport.diffusion_form": "constant"}, "crashes"),
    ({"sample.steps": "ddim50"}, "number of time-grid points"),
    ({"timestep_sampling.kind": "logitnormal"}, "timestep_sampling"),
    ({"loss_weighting.kind": "min_snr", "transport.prediction": "noise",
      "transport.loss_weight": "velocity"}, "replaces transport.loss_weight"),
    ({"loss_weighting.kind": "snr"}, "loss_weighting.kind"),
    ({"sample.guidance_interval": (0.5, 2.0)}, "guidance_interval"),
])
def test_invalid_objective_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.make_objective(transport_config(**overrides))


def test_ddpm_objective_refuses_transport_samplers():
    config = config_lib.base_config()
    config.sample.sampler = "ode"
    with pytest.raises(ValueError, match="objective='ddpm'; use one of \\('ddpm'"):
        config_lib.make_objective(config)
    with pytest.raises(ValueError, match="objective='transport'"):
        sampler_lib.check_sampler("ddim", "transport", "the export's sampler")


def test_config_builds_each_objective():
    assert isinstance(config_lib.make_objective(config_lib.base_config()), objective.DDPMObjective)
    obj = config_lib.make_objective(transport_config(**{
        "transport.path_type": "GVP", "timestep_sampling.kind": "logit_normal",
        "loss_weighting.kind": "min_snr", "loss_weighting.gamma": 4.0}))
    assert isinstance(obj, objective.TransportObjective)
    assert obj.transport.path_type == "GVP" and obj.min_snr_gamma == 4.0
    fn = config_lib.make_transport_sampling_fn(transport_config(), "sde", 20)
    assert fn.stochastic and fn.num_steps == 20


def test_transport_model_trains_exports_and_samples_as_its_previews(tmp_path, monkeypatch):
    """A tiny DiT (learned sigma: 2C outputs) trains with transport + logit-normal + min-SNR,
    previews through the SDE with guidance on an interval; its export samples the preview's
    images with --mode=sample (sde) and the ODE; in-loop evaluation draws --mode=sample's
    images; samplers of the other objective fail before compiling."""
    from PIL import Image
    from udit_jax import export, sample, sampler, train
    from udit_jax.evaluation import in_training
    overrides = {
        "model.name": "DiT",
        "model.kwargs": {"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2,
                         "class_dropout_prob": 0.1},
        "data.source": "synthetic", "data.space": "pixel", "data.image_size": 8,
        "data.channels": 1, "data.num_classes": 3, "batch_size": 8, "total_steps": 2,
        # Large steps and EMA = params: the zero-initialised output layer moves, so the
        # images depend on the model and its guidance.
        "optimizer.learning_rate": 0.05, "optimizer.ema_decay": 0.0,
        "log_every_steps": 1, "checkpoint_every_steps": 2, "sample_every_steps": 2,
        "sample.classes": [0, 2], "sample.per_class": 2, "sample.cfg_scale": 2.0,
        "sample.guidance_interval": (0.2, 0.8), "sample.write_png": False,
        "objective": "transport", "sample.sampler": "sde", "sample.steps": "10",
        "timestep_sampling.kind": "logit_normal", "loss_weighting.kind": "min_snr",
        "eval.num_samples": 3, "eval.in_loop_num_samples": 3, "eval.sample_batch": 4,
        "eval.seed": 5, "eval.sampler": "sde", "eval.steps": "10", "eval.cfg_scale": 2.0,
        "eval.reference_npz": "unused.npz", "eval.inception_weights": "unused.pth"}
    config = transport_config(**overrides)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))
    preview = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
    export.export_from_config(config, str(tmp_path))
    assert export.read_info(tmp_path / "export")["objective"]["name"] == "transport"

    # --mode=sample (SDE) of the export: the preview grid, image for image.
    job = sample.sample_from_config(config, str(tmp_path))
    assert pathlib.Path(job["out_dir"]).name == "sde_Euler-10-cfg2-interval0.2-0.8-seed0-grid2x2"
    with np.load(job["npz"]) as f:
        images, labels = f["arr_0"], f["arr_1"]
    np.testing.assert_array_equal(labels, [0, 0, 2, 2])
    assert images.std() > 10
    np.testing.assert_array_equal(sampler.make_grid(images, 2)[..., 0], preview)

    # The ODE samples it too; other images than the SDE's.
    ode = sample.sample_from_config(transport_config(**{
        **overrides, "sample.sampler": "ode", "sample.steps": "4",
        "transport.ode_method": "heun2"}), str(tmp_path))
    with np.load(ode["npz"]) as f:
        ode_images = f["arr_0"]
    assert ode_images.shape == images.shape and ode_images.std() > 10
    assert (ode_images != images).mean() > 0.5

    # In-loop evaluation (now allowed for transport) draws --mode=sample's images.
    config_lib.validate(transport_config(**{**overrides, "eval_every_steps": 2}))
    model, ema, _ = export.load_export(tmp_path / "export")
    in_loop = np.concatenate(list(in_training.InTrainingEvaluation(
        config, model, config_lib.make_mesh(config)).images(ema)))
    job = sample.sample_from_config(transport_config(**{
        **overrides, "sample.num_images": 3, "sample.seed": 5}), str(tmp_path))
    with np.load(job["npz"]) as f:
        np.testing.assert_array_equal(in_loop[..., :1], f["arr_0"])

    # A DDPM sampler of this export fails before anything compiles (and the other way round).
    def no_compiling(*args):
        raise AssertionError("a sampler was built")

    monkeypatch.setattr(sample, "_job_sampler", no_compiling)
    ddpm = config_lib.base_config()
    ddpm.update_from_flattened_dict({k: v for k, v in overrides.items() if k.startswith("data.")
                                     or k.startswith("model.")})
    ddpm.sample.out_dir = str(tmp_path / "ddpm")
    for sampler_name in ("ddpm", "dpm"):
        ddpm.sample.sampler = sampler_name
        with pytest.raises(ValueError, match=f"sample.sampler='{sampler_name}' samples 'ddpm' "
                                             "models, but this model was trained with "
                                             "objective='transport'"):
            sample.sample_from_config(ddpm, str(tmp_path))
    assert not (tmp_path / "ddpm").exists()
    with pytest.raises(ValueError, match="trained with objective='transport'"):
        sample.run_sampling_job(tmp_path / "export", tmp_path / "ddim", classes=[0],
                                sampler="ddim")
    ddpm_export = tmp_path / "ddpm_export"
    export.write_export(ddpm_export, model, ema, diffusion=config_lib.diffusion_arguments(ddpm),
                        data=export.read_info(tmp_path / "export")["data"], vae=None,
                        metadata={"source": "test"})
    with pytest.raises(ValueError, match="sampler='sde' samples 'transport' models, but this "
                                         "model was trained with objective='ddpm'"):
        sample.run_sampling_job(ddpm_export, tmp_path / "sde", classes=[0], sampler="sde")


def test_export_records_the_objective_and_refuses_the_other_samplers(tmp_path):
    from udit_jax import export, models
    model = models.build_model("DiT", input_size=4, in_channels=1, num_classes=2, patch_size=2,
                               hidden_size=16, depth=1, num_heads=2)
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32),
                          jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0))))
    config = transport_config(**{"transport.path_type": "VP", "transport.prediction": "noise"})
    kwargs = dict(diffusion={"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
                  data={"space": "pixel", "image_size": 4, "channels": 1, "num_classes": 2,
                        "latent_scale": 0.18215}, vae=None, metadata={"source": "test"})
    export.write_export(tmp_path / "t", model, params,
                        objective=config_lib.objective_description(config), **kwargs)
    info = export.read_info(tmp_path / "t")
    assert config_lib.export_objective(info) == "transport"
    tr = transport.create_transport(**info["objective"]["transport"])
    assert (tr.path_type, tr.prediction, tr.train_eps) == ("VP", "noise", 1e-5)
    with pytest.raises(ValueError, match="trained with objective='transport'"):
        sampler_lib.check_sampler("ddpm", config_lib.export_objective(info))
    export.write_export(tmp_path / "d", model, params, **kwargs)       # DDPM (and older) exports
    assert config_lib.export_objective(export.read_info(tmp_path / "d")) == "ddpm"
