"""Parity of udit_jax.diffusion with the official DiT `diffusion/` package (fixtures), plus
respacing rules and input errors.

Fixture arrays are NCHW; they are transposed to NHWC here, at the test boundary. Groups and
respacings are read from the files and the manifest, so a second fixture set with other
sizes, steps and classes runs unchanged.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, assert_close_rel, load_npz
from udit_jax import convert, diffusion, models


# ---- fixture helpers ---------------------------------------------------------------------------

def nhwc(a):
    """NCHW (or [steps, N, C, H, W]) fixture array -> channels-last."""
    a = np.asarray(a)
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    if a.ndim == 5:
        return a.transpose(0, 1, 3, 4, 2)
    return a


def groups(data: dict, pattern: str) -> list[str]:
    """Sorted group prefixes ('q1000', ...) of keys '<group>.<name>' matching `pattern`."""
    found = {k.split(".")[0] for k in data if re.fullmatch(pattern, k.split(".")[0])}
    return sorted(found)


def manifest_diffusion() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())["diffusion"]


def respacing_for(tag: str) -> str:
    """The timestep_respacing the fixture used for schedule tag / group suffix `tag`."""
    call = manifest_diffusion().get("create_diffusion_calls", {}).get(tag)
    if call is not None:
        match = re.search(r"create_diffusion\((?:timestep_respacing=)?'([^']*)'", call)
        if match:
            return match.group(1)
    return tag


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return load_npz("diffusion_io.npz")


@pytest.fixture(scope="module")
def dit():
    """(model, params) of the reduced DiT the diffusion fixtures were generated with."""
    from conftest import FIXTURES as root
    config = json.loads((root / "manifest.json").read_text())["dit_reduced"]["config"]
    model = models.build_model("DiT", **config)
    params = convert.params_from_torch(model, load_npz("dit_reduced_state_dict.npz"))
    return model, params


def dit_fn(dit, cfg: bool = False):
    model, params = dit
    if cfg:
        return jax.jit(lambda x, t, y, cfg_scale: model.apply({"params": params}, x, t, y, cfg_scale,
                                                              method="forward_with_cfg"))
    return jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y))


def stored_output_fn(expected_model_t, output):
    """A model_fn that returns a stored model output and checks the timesteps it is given."""
    def fn(x, t, **kwargs):
        np.testing.assert_array_equal(np.asarray(t), expected_model_t, "model got the wrong timesteps")
        return jnp.asarray(nhwc(output))
    return fn


# ---- schedules ---------------------------------------------------------------------------------

def test_schedule_tables_match_official(fixtures_dir):
    tables = load_npz("diffusion_schedules.npz")
    tags = sorted({k.split(".")[0] for k in tables})
    assert tags, "no schedule tables in the fixture"
    for tag in tags:
        d = diffusion.create_diffusion(respacing_for(tag))
        for name in diffusion.TABLE_NAMES:
            expected = tables[f"{tag}.{name}"]
            actual = getattr(d, name)
            assert actual.dtype == np.float64, f"{tag}.{name} must be float64"
            np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=0, err_msg=f"{tag}.{name}")
        np.testing.assert_array_equal(d.timestep_map, tables[f"{tag}.timestep_map"], f"{tag}.timestep_map")
        assert d.num_timesteps == len(tables[f"{tag}.betas"])


def test_q_functions_match_official(io):
    names = groups(io, r"q\d+")
    assert names, "no q_* groups in diffusion_io.npz"
    x0, noise = nhwc(io["x_start"]), nhwc(io["noise"])
    for g in names:
        d = diffusion.create_diffusion(respacing_for(g[1:]))
        t = jnp.asarray(io[f"{g}.t"])
        x_t = d.q_sample(x0, t, noise)
        assert_close_rel(x_t, nhwc(io[f"{g}.q_sample"]), 1e-6, f"{g}.q_sample")
        for name, value in zip(("q_mean", "q_variance", "q_log_variance"), d.q_mean_variance(x0, t)):
            assert_close_rel(value, nhwc(io[f"{g}.{name}"]), 1e-6, f"{g}.{name}")
        posterior = d.q_posterior_mean_variance(x0, x_t, t)
        for name, value in zip(("posterior_mean", "posterior_variance", "posterior_log_variance_clipped"),
                               posterior):
            assert_close_rel(value, nhwc(io[f"{g}.{name}"]), 1e-6, f"{g}.{name}")


# ---- training losses ---------------------------------------------------------------------------

def _check_losses(io, g, model_fn):
    d = diffusion.create_diffusion(respacing_for(g[len("train"):]))
    t = jnp.asarray(io[f"{g}.t"])
    np.testing.assert_array_equal(d.timestep_map[io[f"{g}.t"]], io[f"{g}.model_t"])
    assert_close_rel(d.q_sample(nhwc(io["x_start"]), t, nhwc(io["noise"])), nhwc(io[f"{g}.x_t"]),
                     1e-6, f"{g}.x_t")
    terms = d.training_losses(model_fn, jnp.asarray(nhwc(io["x_start"])), t,
                              noise=jnp.asarray(nhwc(io["noise"])), model_kwargs={"y": jnp.asarray(io["y"])})
    assert set(terms) == {"loss", "mse", "vb"}
    for name in ("loss", "mse", "vb"):
        expected = io[f"{g}.{name}"]
        np.testing.assert_allclose(terms[name], expected, rtol=1e-5, atol=1e-7, err_msg=f"{g}.{name}")


def test_training_losses_from_stored_model_output(io):
    names = groups(io, r"train\d+")
    assert names
    for g in names:
        _check_losses(io, g, stored_output_fn(io[f"{g}.model_t"], io[f"{g}.model_output"]))


def test_training_losses_with_dit(io, dit):
    model_fn = dit_fn(dit)
    for g in groups(io, r"train\d+"):
        _check_losses(io, g, model_fn)


# ---- one reverse step --------------------------------------------------------------------------

def _check_p_sample(io, g, clip, model_fn, d):
    t = jnp.asarray(io[f"{g}.t"])
    x = jnp.asarray(nhwc(io[f"{g}.x"]))
    out = d.p_mean_variance(model_fn, x, t, clip_denoised=clip, model_kwargs={"y": jnp.asarray(io["y"])})
    prefix = f"{g}_clip" if clip else g
    # x0 = x / sqrt(abar) - sqrt(1 / abar - 1) * eps multiplies the model's float32 rounding by
    # up to ~157 (t = 999); clipping keeps |x0| <= 1, so judge x0 on that gain's scale.
    gain = max(1.0, float(np.max(d.sqrt_recipm1_alphas_cumprod[np.asarray(io[f"{g}.t"])])))
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        rel = 1e-5 * gain if name == "pred_xstart" else 1e-5
        assert_close_rel(out[name], nhwc(io[f"{prefix}.{name}"]), rel, f"{prefix}.{name}")
    step = d.p_sample(model_fn, x, t, noise=jnp.asarray(nhwc(io[f"{g}.noise"])), clip_denoised=clip,
                      model_kwargs={"y": jnp.asarray(io["y"])})
    assert_close_rel(step["sample"], nhwc(io[f"{prefix}.sample"]), 1e-5, f"{prefix}.sample")


def test_p_sample_from_stored_model_output(io):
    names = groups(io, r"psample\d+")
    assert names
    for g in names:
        d = diffusion.create_diffusion(respacing_for(g[len("psample"):]))
        model_fn = stored_output_fn(io[f"{g}.model_t"], io[f"{g}.model_output"])
        for clip in (False, True):
            _check_p_sample(io, g, clip, model_fn, d)


def test_p_sample_with_dit(io, dit):
    for g in groups(io, r"psample\d+"):
        d = diffusion.create_diffusion(respacing_for(g[len("psample"):]))
        for clip in (False, True):
            _check_p_sample(io, g, clip, dit_fn(dit), d)


# ---- ten-step loops ----------------------------------------------------------------------------

LOOP_PATTERN = r"(cfg)?(loop|ddim)\d+(_clip)?"


def test_sampling_loops_match_official(io, dit):
    loops = groups(io, LOOP_PATTERN)
    assert len(loops) == 5, f"expected 5 sampling loops in the fixture, found {loops}"
    d = diffusion.create_diffusion(str(manifest_diffusion()["params"]["loop_steps"]))
    for g in loops:
        match = re.fullmatch(LOOP_PATTERN, g)
        cfg, ddim, clip = match.group(1) is not None, match.group(2) == "ddim", match.group(3) is not None
        np.testing.assert_array_equal(io[f"{g}.timesteps"], np.arange(d.num_timesteps)[::-1])
        np.testing.assert_array_equal(d.timestep_map[io[f"{g}.timesteps"]], io[f"{g}.model_timesteps"])
        z = jnp.asarray(nhwc(io[f"{g}.z"]))
        kwargs = {"y": jnp.asarray(io[f"{g}.y"])}
        if cfg:
            kwargs["cfg_scale"] = float(io[f"{g}.cfg_scale"])
        sampler = d.ddim_sample_loop if ddim else d.p_sample_loop
        run = jax.jit(lambda z, step_noise, kwargs: sampler(
            dit_fn(dit, cfg), z.shape, noise=z, step_noise=step_noise, clip_denoised=clip,
            model_kwargs=kwargs, return_trajectory=True))
        final, trajectory = run(z, jnp.asarray(nhwc(io[f"{g}.step_noise"])), kwargs)
        for k, t in enumerate(io[f"{g}.timesteps"]):
            assert_close_rel(trajectory["sample"][k], nhwc(io[f"{g}.samples"][k]), 1e-5,
                             f"{g}.samples[{k}]")
            # x0 = x / sqrt(abar) - sqrt(1 / abar - 1) eps multiplies model round-off by up to
            # ~157 at t = 999; clipping keeps |x0| <= 1, so judge it on that gain's scale.
            gain = max(1.0, float(d.sqrt_recipm1_alphas_cumprod[t]))
            expected = nhwc(io[f"{g}.pred_xstart"][k])
            err = np.max(np.abs(np.asarray(trajectory["pred_xstart"][k]) - expected))
            assert err <= 1e-5 * max(gain, np.abs(expected).max()), f"{g}.pred_xstart[{k}]: {err:.3g}"
        assert_close_rel(final, nhwc(io[f"{g}.final"]), 1e-5, f"{g}.final")


# ---- respacing rules ---------------------------------------------------------------------------

def test_space_timesteps_rules():
    # The fractional stride 4.5 is accumulated and rounded half-to-even: 0, round(4.5)=4, 9.
    assert diffusion.space_timesteps(10, "3") == [0, 4, 9]
    # Sections of 5 steps: stride 4 in the first, 2 in the second (offset 5).
    assert diffusion.space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert diffusion.space_timesteps(10, [2, 3]) == [0, 4, 5, 7, 9]
    # ddimN: the first integer stride giving exactly N steps.
    assert diffusion.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert diffusion.space_timesteps(1000, "ddim3") == [0, 334, 668]
    assert diffusion.space_timesteps(1000, "1000") == list(range(1000))
    d = diffusion.create_diffusion("")
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


def test_respaced_process_keeps_original_alphas_cumprod():
    base = diffusion.create_diffusion("")
    for respacing in ("250", "ddim25", "10,20,30"):
        d = diffusion.create_diffusion(respacing)
        np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)


@pytest.mark.parametrize("respacing, message", [
    ("abc", "not understood"),
    ("25x", "not understood"),
    ("ddimx", "ddimN"),
    ("ddim999", "no integer stride"),
    ("ddim0", "DDIM needs at least 1 step"),   # not "use a plain count such as '0'"
    ("2000", "asks for 2000 steps"),
    ("0", "at least one step"),
    ("1", "at least 2"),
])
def test_bad_respacing_raises(respacing, message):
    with pytest.raises(ValueError, match=message):
        diffusion.create_diffusion(respacing)


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="unknown noise_schedule 'cosine'.*squaredcos_cap_v2"):
        diffusion.create_diffusion("", noise_schedule="cosine")
    with pytest.raises(TypeError):
        diffusion.create_diffusion("", learn_var=True)  # not an official argument
    with pytest.raises(ValueError, match="diffusion_steps"):
        diffusion.create_diffusion("", diffusion_steps=0)


def test_cosine_schedule_is_capped_and_decreasing():
    d = diffusion.create_diffusion("", noise_schedule="squaredcos_cap_v2")
    assert d.betas.max() <= 0.999 and np.all(np.diff(d.alphas_cumprod) < 0)
    # abar follows cos^2((t/T + s)/(1 + s) * pi/2) / cos^2(s/(1 + s) * pi/2) while uncapped.
    t = np.arange(1, 501)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(d.alphas_cumprod[:500], f(t / 1000) / f(0.0), rtol=1e-9)


# ---- input errors ------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    d = diffusion.create_diffusion("10")
    x = jnp.zeros((2, 4, 4, 3))
    good_fn = lambda x, t, **kw: jnp.zeros(x.shape[:-1] + (6,))
    with pytest.raises(ValueError, match="t must have shape"):
        d.q_sample(x, jnp.zeros((3,), jnp.int32), x)
    with pytest.raises(ValueError, match="integer"):
        d.q_sample(x, jnp.zeros((2,)), x)
    with pytest.raises(ValueError, match="model output has shape .*channels-last"):
        d.p_mean_variance(lambda x, t, **kw: jnp.zeros((2, 6, 4, 4)), x, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="pass noise=<array> or key="):
        d.training_losses(good_fn, x, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="start noise"):
        d.p_sample_loop(good_fn, x.shape)
    with pytest.raises(ValueError, match="step_noise=<array of shape"):
        d.p_sample_loop(good_fn, x.shape, noise=x)
    with pytest.raises(ValueError, match=r"step_noise has shape \(9,"):
        d.p_sample_loop(good_fn, x.shape, noise=x, step_noise=jnp.zeros((9,) + x.shape))
    with pytest.raises(ValueError, match="noise has shape"):
        d.ddim_sample_loop(good_fn, (2, 4, 4, 4), noise=x)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        d.dpm_solver_sample_loop(good_fn, x.shape, noise=x, order=3)
    with pytest.raises(ValueError, match="progress"):
        d.ddim_sample_loop(good_fn, x.shape, noise=x, progress=0)
