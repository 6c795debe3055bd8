"""Parity of udit_jax.diffusion.transport with the official SiT code ($UDIT_FIXTURES/sit).

Every case's settings (path, prediction, eps, solver, steps, CFG, ...) and shapes come from
the fixture folder's manifest.json and arrays, so another fixture set with other sizes,
seeds and options runs unchanged. float32 runs are checked with the README's per-case
tolerances (scale-relative, per array); float64 runs (jax.enable_x64) against
sit_float64_reference.npz at the README's 1e-10; time grids bitwise.
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, assert_close_rel
from udit_jax.diffusion import transport
from udit_jax.models.layers import guided_output

SIT = FIXTURES / "sit"
CFG_GUIDED_CHANNELS = 3  # upstream forward_with_cfg guides out[:, :3], whatever C is


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    with open(SIT / "manifest.json") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def npz(name: str) -> dict:
    with np.load(SIT / name) as data:
        return {k: data[k] for k in data.files}


def case_params(group: str):
    """The manifest's cases of one group as pytest params (one failing param if absent)."""
    if not (SIT / "manifest.json").is_file():
        return [pytest.param(None, id="fixtures-missing")]
    return [pytest.param(c, id=c["name"]) for c in manifest()["cases"][group]]


@pytest.fixture(autouse=True)
def _sit_fixtures(fixtures_dir):
    if not (fixtures_dir / "sit" / "manifest.json").is_file():
        pytest.fail(f"SiT fixtures not found at {fixtures_dir / 'sit'}; set UDIT_FIXTURES")


def f32_tol(file: str, case: str) -> float:
    return manifest()["recommended_tolerance"]["float32"][f"{file}::{case}"]


def f64_tol() -> float:
    return float(manifest()["recommended_tolerance"]["float64_reference"])


DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


def x64(dtype):
    return jax.enable_x64(np.dtype(dtype) == np.float64)


def nhwc(a):
    """[..., C, H, W] (fixtures) -> [..., H, W, C] (the port)."""
    return np.moveaxis(np.asarray(a), -3, -1)


def nchw(a):
    return np.moveaxis(np.asarray(a), -1, -3)


def ref_value(group: str, case: str, field: str, dtype, data: dict):
    """The float32 file's value, or the float64 reference's `<group>/<case>/<field>`."""
    if np.dtype(dtype) == np.float64:
        return npz("sit_float64_reference.npz")[f"{group}/{case}/{field}"]
    return data[f"{case}/{field}"]


def check(got, ref, tol, what):
    got = np.asarray(got)
    assert np.all(np.isfinite(got)) or not np.all(np.isfinite(ref)), f"{what}: non-finite output"
    assert_close_rel(got, ref, tol, what)


# ---- the tiny model of the README ----------------------------------------------------------

def tiny_model(prediction: str, dtype):
    """model(x [B, H, W, C], t [B], y [B]) of the README, channel sum left to right."""
    p = npz("sit_tiny_model.npz")
    w, bias, tcoef, emb = (jnp.asarray(p[f"{prediction}/{k}"], dtype)
                           for k in ("W", "bias", "tcoef", "emb"))

    def model(x, t, y):
        acc = x[..., 0:1] * w[:, 0]
        for c in range(1, x.shape[-1]):
            acc = acc + x[..., c:c + 1] * w[:, c]
        t = jnp.asarray(t, dtype)[:, None, None, None]
        return ((acc + bias) + tcoef * t) + emb[y][:, None, None, :]

    return model


def case_model(case: dict, dtype):
    """(model_fn, extra kwargs): upstream's forward_with_cfg for CFG cases, else the model."""
    model = tiny_model(case["model"], dtype)
    if case.get("cfg_scale") is None:
        return model, {}

    def forward_with_cfg(x, t, y, cfg_scale):
        half = x[: x.shape[0] // 2]
        out = model(jnp.concatenate([half, half]), t, y)
        return guided_output(out, cfg_scale, CFG_GUIDED_CHANNELS)

    return forward_with_cfg, {"cfg_scale": case["cfg_scale"]}


def case_transport(case: dict):
    return transport.create_transport(case["path_type"], case["prediction"], case["loss_weight"],
                                      case["train_eps_arg"], case["sample_eps_arg"])


def check_eps(tr, case):
    assert (tr.train_eps, tr.sample_eps) == (case["train_eps_effective"],
                                            case["sample_eps_effective"])


# ---- training losses -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", case_params("training"))
def test_training_losses(case, dtype):
    data, name = npz("sit_training_losses.npz"), case["name"]
    tr = case_transport(case)
    check_eps(tr, case)
    assert tr.check_interval() == tuple(case["t_interval"])
    tol = f64_tol() if np.dtype(dtype) == np.float64 else f32_tol("sit_training_losses.npz", name)
    with x64(dtype):
        model = tiny_model(case["model"], dtype)
        fn = jax.jit(lambda x1, y, u, x0: tr.training_losses(model, x1, {"y": y}, u=u, noise=x0))
        terms = fn(nhwc(data["x1"]).astype(dtype), data["y"], data["u"].astype(dtype),
                   nhwc(data["x0"]).astype(dtype))
        fields = ["t", "loss"] + (["weight"] if f"{name}/weight" in data else [])
        if np.dtype(dtype) == np.float32:
            fields += ["xt", "ut", "pred"]
        for field in fields:
            ref = ref_value("training", name, field, dtype, data)
            got = terms[field]
            got = nchw(got) if got.ndim == 4 and ref.ndim == 4 else np.reshape(got, ref.shape)
            check(got, ref, tol, f"{name}/{field}")


# ---- path coefficients, drift, score ---------------------------------------------------------

def path_names() -> list[str]:
    if not (SIT / "sit_paths.npz").is_file():
        return ["fixtures-missing"]
    return sorted({k.split("/")[0] for k in npz("sit_paths.npz") if k.endswith("/alpha_t")})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path_type", path_names())
def test_paths(path_type, dtype):
    data = npz("sit_paths.npz")
    f64 = np.dtype(dtype) == np.float64
    tol = f64_tol() if f64 else f32_tol("sit_paths.npz", path_type)
    ref = (lambda k: npz("sit_float64_reference.npz")[f"paths/{k}"]) if f64 else (lambda k: data[k])
    path = transport.make_path(path_type)
    with x64(dtype):
        t = jnp.asarray(data["t"], dtype)
        x, v, s = (jnp.asarray(nhwc(data[k]), dtype) for k in ("x", "v", "s"))
        y = jnp.asarray(data["y"])
        alpha, d_alpha = path.compute_alpha_t(t)
        sigma, d_sigma = path.compute_sigma_t(t)
        drift_mean, drift_var = path.compute_drift(x, t)
        got = {"alpha_t": alpha, "d_alpha_t": d_alpha, "sigma_t": sigma, "d_sigma_t": d_sigma,
               "d_alpha_alpha_ratio_t": path.compute_d_alpha_alpha_ratio_t(t),
               "drift_mean": drift_mean, "drift_var": drift_var,
               "score_from_velocity": path.get_score_from_velocity(v, x, t),
               "noise_from_velocity": path.get_noise_from_velocity(v, x, t),
               "velocity_from_score": path.get_velocity_from_score(s, x, t)}
        _, got["plan_xt"], got["plan_ut"] = path.plan(t, v, x)
        norms = data["diffusion_norms"]
        for key in data:
            m = re.fullmatch(rf"{re.escape(path_type)}/diffusion/(.+)/norm(\d+)", key)
            if m:
                got[key[len(path_type) + 1:]] = path.compute_diffusion(
                    x, t, m.group(1), float(norms[int(m.group(2))]))
        for pred in transport.PREDICTIONS:
            if f"{path_type}/{pred}/drift" not in data:
                continue
            tr = transport.create_transport(path_type, pred)
            model = tiny_model(pred, dtype)
            got[f"{pred}/drift"] = tr.get_drift()(x, t, model, y=y)
            got[f"{pred}/score"] = tr.get_score()(x, t, model, y=y)
        expected_keys = {k[len(path_type) + 1:] for k in data if k.startswith(path_type + "/")}
        assert expected_keys <= set(got), f"untested keys {expected_keys - set(got)}"
        for key in sorted(expected_keys):
            r = ref(f"{path_type}/{key}")
            g = np.asarray(got[key])
            if r.ndim == 4:
                g = nchw(g)
            else:  # [T], [T, 1, 1, 1], or a constant derivative (Linear)
                g = g.reshape(r.shape) if g.size == r.size else np.broadcast_to(g, r.shape)
            check(g, r, tol, f"{path_type}/{key}")


# ---- time grids and intervals ----------------------------------------------------------------

def interval_kwargs(mode: str, last_step_size: float) -> dict:
    if mode == "train":
        return {}
    if mode in ("ode", "ode_reverse"):
        return {"eval": True, "reverse": mode == "ode_reverse"}
    m = re.fullmatch(r"sde_(.+)_(nolast|last)", mode)
    assert m, f"unknown interval mode {mode}"
    return {"eval": True, "sde": True, "diffusion_form": m.group(1),
            "last_step_size": last_step_size if m.group(2) == "last" else 0.0}


def test_intervals():
    data = npz("sit_time_grids.npz")
    lss = float(data["interval/last_step_size"][0])
    for cfg in manifest()["cases"]["time_grid_configs"]:
        name = cfg["name"]
        tr = transport.create_transport(cfg["path_type"], cfg["prediction"], None,
                                        cfg["train_eps_arg"], cfg["sample_eps_arg"])
        np.testing.assert_array_equal(
            np.asarray([tr.train_eps, tr.sample_eps], np.float64),
            data[f"interval/{name}/eps_effective"], err_msg=name)
        for mode in cfg["modes"]:
            got = tr.check_interval(**interval_kwargs(mode, lss))
            np.testing.assert_array_equal(np.asarray(got, np.float64), data[f"interval/{name}/{mode}"],
                                          err_msg=f"{name}/{mode}")


def test_linspace_bitwise():
    data = npz("sit_time_grids.npz")
    for k, (start, end, n) in enumerate(data["linspace/args"]):
        got = transport.time_grid(start, end, int(n), np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), data[f"linspace/{k}"].view(np.uint32),
                                      err_msg=f"linspace({start}, {end}, {int(n)})")


# ---- samplers --------------------------------------------------------------------------------

def check_grid(sampling_fn, case, data, dtype, group):
    """The sampler's interval and time grid: bitwise in float32, against the x64 run in float64."""
    name = case["name"]
    assert sampling_fn.t_interval == (case["t0"], case["t1"])
    got = transport.time_grid(*sampling_fn.t_interval, case["num_steps"], dtype)
    if np.dtype(dtype) == np.float32:
        np.testing.assert_array_equal(got.view(np.uint32), data[f"{name}/t_grid"].view(np.uint32),
                                      err_msg=f"{name}/t_grid")
    else:
        check(got, ref_value(group, name, "t_grid", dtype, data), f64_tol(), f"{name}/t_grid")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", case_params("ode"))
def test_sample_ode(case, dtype):
    data, name = npz("sit_ode.npz"), case["name"]
    tr = case_transport(case)
    check_eps(tr, case)
    fn = transport.Sampler(tr).sample_ode(sampling_method=case["sampling_method"],
                                          num_steps=case["num_steps"], atol=case["atol"],
                                          rtol=case["rtol"], reverse=case["reverse"])
    check_grid(fn, case, data, dtype, "ode")
    tol = f64_tol() if np.dtype(dtype) == np.float64 else f32_tol("sit_ode.npz", name)
    with x64(dtype):
        model, extra = case_model(case, dtype)
        traj = jax.jit(lambda z, y: fn(z, model, y=y, **extra))(
            nhwc(data[f"{name}/z"]).astype(dtype), data[f"{name}/y"])
        check(nchw(traj), ref_value("ode", name, "traj", dtype, data), tol, f"{name}/traj")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", case_params("likelihood"))
def test_sample_ode_likelihood(case, dtype):
    data, name = npz("sit_ode_likelihood.npz"), case["name"]
    tr = case_transport(case)
    check_eps(tr, case)
    fn = transport.Sampler(tr).sample_ode_likelihood(
        sampling_method=case["sampling_method"], num_steps=case["num_steps"], atol=case["atol"],
        rtol=case["rtol"])
    assert tr.check_interval(eval=True) == (case["t0"], case["t1"])
    tol = f64_tol() if np.dtype(dtype) == np.float64 else f32_tol("sit_ode_likelihood.npz", name)
    with x64(dtype):
        model, extra = case_model(case, dtype)
        probes = data[f"{name}/probes"]
        assert probes.shape[0] == case["n_probe_draws"]
        logp, z, (traj_x, traj_dlogp) = jax.jit(
            lambda x, y, p: fn(x, model, probes=p, return_trajectory=True, y=y, **extra))(
            nhwc(data[f"{name}/x"]).astype(dtype), data[f"{name}/y"], nhwc(probes).astype(dtype))
        got = {"traj_x": nchw(traj_x), "traj_dlogp": traj_dlogp, "z": nchw(z), "logp": logp,
               "prior_logp": tr.prior_logp(z)}
        if np.dtype(dtype) == np.float64:
            got["t_grid"] = transport.time_grid(case["t0"], case["t1"], case["num_steps"], dtype)
        else:
            np.testing.assert_array_equal(
                transport.time_grid(case["t0"], case["t1"], case["num_steps"], dtype),
                data[f"{name}/t_grid"])
        for field, value in got.items():
            check(value, ref_value("likelihood", name, field, dtype, data), tol, f"{name}/{field}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", case_params("sde"))
def test_sample_sde(case, dtype):
    data, name = npz("sit_sde.npz"), case["name"]
    tr = case_transport(case)
    check_eps(tr, case)
    fn = transport.Sampler(tr).sample_sde(
        sampling_method=case["sampling_method"], diffusion_form=case["diffusion_form"],
        diffusion_norm=case["diffusion_norm"], last_step=case["last_step"],
        last_step_size=case["last_step_size"], num_steps=case["num_steps"])
    check_grid(fn, case, data, dtype, "sde")
    tol = f64_tol() if np.dtype(dtype) == np.float64 else f32_tol("sit_sde.npz", name)
    with x64(dtype):
        model, extra = case_model(case, dtype)
        xs = jax.jit(lambda z, y, w: fn(z, model, noise=w, y=y, **extra))(
            nhwc(data[f"{name}/z"]).astype(dtype), data[f"{name}/y"],
            nhwc(data[f"{name}/noise"]).astype(dtype))
        check(nchw(xs), ref_value("sde", name, "xs", dtype, data), tol, f"{name}/xs")
        grid = transport.time_grid(case["t0"], case["t1"], case["num_steps"], dtype)
        check(np.reshape(grid[1] - grid[0], (1,)), ref_value("sde", name, "dt", dtype, data),
              0.0 if np.dtype(dtype) == np.float32 else f64_tol(), f"{name}/dt")
