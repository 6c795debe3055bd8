"""SD AutoencoderKL: parity with diffusers (fixtures), weight conversion, helpers, sharding."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, REPO_ROOT, assert_close_rel, load_npz, xla_flags
from udit_jax import convert, models
from udit_jax.convert.common import ConversionError, check_state_dict
from udit_jax.convert.vae import (diffusers_state_dict, load_vae_params, vae_params_to_torch,
                                  vae_torch_key_specs)
from udit_jax.models.vae import (DiagonalGaussian, GroupNorm, MidBlockAttention, decode_latents,
                                 encode_to_latents)

REL = 1e-5


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def reduced(fixtures_dir):
    """The fixture VAE: config, converted params, io arrays, activations, state_dict."""
    config = json.loads((fixtures_dir / "manifest.json").read_text())["vae_reduced"]["effective_config"]
    vae = models.build_vae(**config)
    state_dict = load_npz("vae_reduced_state_dict.npz")
    params = convert.vae_params_from_torch(vae, state_dict)
    return dict(config=config, vae=vae, params=params, state_dict=state_dict,
                io=load_npz("vae_reduced_io.npz"), acts=load_npz("vae_reduced_activations.npz"))


@pytest.fixture(scope="module")
def full_config(fixtures_dir):
    return json.loads((fixtures_dir / "vae_full_config.json").read_text())


# ----------------------------------------------------------------------------- parity


def test_posterior_matches_diffusers(reduced):
    vae, params, io = reduced["vae"], reduced["params"], reduced["io"]
    mean, logvar = vae.apply({"params": params}, nhwc(io["x"]), method="encode")
    assert mean.dtype == logvar.dtype == jnp.float32
    posterior = DiagonalGaussian(mean, logvar)
    assert_close_rel(nchw(mean), io["mean"], REL, "mean")
    assert_close_rel(nchw(logvar), io["logvar"], REL, "logvar")
    assert_close_rel(nchw(posterior.std), io["std"], REL, "std")
    sample = posterior.sample(noise=jnp.asarray(nhwc(io["sample_eps"])))
    assert_close_rel(nchw(sample), io["latent_sample"], REL, "latent_sample")


def test_decode_and_forward_match_diffusers(reduced):
    vae, params, io = reduced["vae"], reduced["params"], reduced["io"]
    decoded = vae.apply({"params": params}, nhwc(io["mean"]), method="decode")
    assert_close_rel(nchw(decoded), io["decoded_mean"], REL, "decoded_mean")
    forward = vae.apply({"params": params}, nhwc(io["x"]))
    assert_close_rel(nchw(forward), io["forward"], REL, "forward")


def _module_path(torch_path):
    """'encoder.down_blocks.0' -> ('encoder', 'down_blocks_0'): our module names."""
    parts = []
    for token in torch_path.split("."):
        if token.isdigit():
            parts[-1] = f"{parts[-1]}_{token}"
        else:
            parts.append(token)
    return tuple(parts)


def _captured(vae, params, inputs, method):
    _, state = vae.apply({"params": params}, inputs, method=method, capture_intermediates=True,
                         mutable=["intermediates"])
    return state["intermediates"]


def test_every_activation_matches_diffusers(reduced):
    """Each stored submodule output (encode(x) and decode(mean) passes), one module at a time."""
    vae, params, io, acts = reduced["vae"], reduced["params"], reduced["io"], reduced["acts"]
    captured = {"encode": _captured(vae, params, nhwc(io["x"]), "encode"),
                "decode": _captured(vae, params, nhwc(io["mean"]), "decode")}
    checked = 0
    for key, expected in acts.items():
        module, port = key.split("@")
        path = _module_path(module)
        if port == "in0":
            continue  # the attention inputs are checked by the isolated-module test below
        assert port == "out", key
        pass_name = "encode" if path[0] in ("encoder", "quant_conv") else "decode"
        tree = captured[pass_name]
        for part in path:
            assert part in tree, f"{key}: no module {'/'.join(path)} in the {pass_name} pass"
            tree = tree[part]
        assert_close_rel(nchw(tree["__call__"][0]), expected, REL, key)
        checked += 1
    assert checked >= 10, f"only {checked} activations compared; fixture keys changed?"


def test_mid_block_attention_in_isolation(reduced):
    vae, params, acts = reduced["vae"], reduced["params"], reduced["acts"]
    keys = [k for k in acts if k.endswith("@in0")]
    if not vae.mid_block_add_attention:
        assert not keys
        return
    assert keys
    for key in keys:
        module = key.split("@")[0]
        tree = params
        for part in _module_path(module):
            tree = tree[part]
        attn = MidBlockAttention(vae.norm_num_groups)
        out = attn.apply({"params": tree}, nhwc(acts[key]))
        assert_close_rel(nchw(out), acts[f"{module}@out"], REL, module)


def test_scaled_latent_helpers(reduced):
    vae, params, io, config = reduced["vae"], reduced["params"], reduced["io"], reduced["config"]
    assert vae.scaling_factor == config["scaling_factor"]
    x = nhwc(io["x"])
    latents = encode_to_latents(vae, params, x, noise=jnp.asarray(nhwc(io["sample_eps"])))
    assert_close_rel(nchw(latents), io["latent_sample"] * config["scaling_factor"], REL, "scaled sample")
    mean_latents = encode_to_latents(vae, params, x)
    assert_close_rel(nchw(mean_latents), io["mean"] * config["scaling_factor"], REL, "scaled mean")
    images = decode_latents(vae, params, mean_latents)
    assert_close_rel(nchw(images), io["decoded_mean"], REL, "decode_latents")


def test_posterior_sample_with_key(reduced):
    io = reduced["io"]
    posterior = DiagonalGaussian(jnp.asarray(nhwc(io["mean"])), jnp.asarray(nhwc(io["logvar"])))
    a = posterior.sample(key=jax.random.key(0))
    np.testing.assert_array_equal(a, posterior.sample(key=jax.random.key(0)))
    assert not np.allclose(a, posterior.sample(key=jax.random.key(1)))
    # The draw's statistics need many values: a fixture posterior may hold only a few (batch 1,
    # a small image), so they are read off a large one with a known mean and std (3 and 2).
    shape = (64, 16, 16, 4)
    big = DiagonalGaussian(jnp.full(shape, 3.0), jnp.full(shape, np.log(4.0)))
    eps = (np.asarray(big.sample(key=jax.random.key(0))) - 3.0) / 2.0
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02, (eps.mean(), eps.std())
    with pytest.raises(ValueError, match="exactly one"):
        posterior.sample()
    with pytest.raises(ValueError, match="noise shape"):
        posterior.sample(noise=jnp.zeros(posterior.mean.shape[:-1] + (posterior.mean.shape[-1] + 1,)))


def test_logvar_is_clamped(reduced):
    vae, io = reduced["vae"], reduced["io"]
    params = jax.tree_util.tree_map(np.copy, reduced["params"])
    last = params["quant_conv"] if vae.use_quant_conv else params["encoder"]["conv_out"]
    channels = vae.latent_channels
    for bias, expected in ((1e4, 20.0), (-1e4, -30.0)):
        last["bias"][channels:] = bias
        _, logvar = vae.apply({"params": params}, nhwc(io["x"]), method="encode")
        np.testing.assert_array_equal(logvar, expected)
        np.testing.assert_allclose(DiagonalGaussian(logvar, logvar).std, math.exp(expected / 2), rtol=1e-6)


# ----------------------------------------------------------------------------- norms, dtypes


def _group_norm_reference(x, groups, gamma, beta, eps=1e-6):
    """float64 torch.nn.GroupNorm on NHWC."""
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


@pytest.mark.parametrize("dtype,rel", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_group_norm_statistics_in_float32(dtype, rel):
    rng = np.random.default_rng(0)
    # A large common offset: bfloat16 statistics would lose the variance entirely.
    x = np.asarray(jnp.asarray(300.0 + rng.normal(size=(2, 4, 4, 8)), dtype).astype(jnp.float32))
    gamma, beta = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    out = GroupNorm(4, dtype).apply({"params": {"scale": gamma, "bias": beta}}, jnp.asarray(x, dtype))
    assert out.dtype == dtype
    assert_close_rel(out, _group_norm_reference(x, 4, gamma, beta), rel, f"GroupNorm {dtype}")


def test_bfloat16_compute_is_close(reduced):
    config, params, io = reduced["config"], reduced["params"], reduced["io"]
    vae = models.build_vae(**config, dtype=jnp.bfloat16)
    mean, logvar = vae.apply({"params": params}, nhwc(io["x"]), method="encode")
    decoded = vae.apply({"params": params}, nhwc(io["mean"]), method="decode")
    assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
    assert_close_rel(nchw(mean), io["mean"], 5e-2, "bf16 mean")
    assert_close_rel(nchw(decoded), io["decoded_mean"], 5e-2, "bf16 decoded")


# ----------------------------------------------------------------------------- conversion

def _old_diffusers_names(state_dict, conv_shaped):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"(.*attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m:
            key = f"{m[1]}{old[m[2]]}.{m[3]}"
            if conv_shaped and m[3] == "weight":
                value = value[:, :, None, None]
        out[key] = value
    return out


def _ldm_names(state_dict, num_levels):
    """Original-LDM (CompVis) names, written out independently of the converter."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in [
            (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
            (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
            (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
            (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
            (r"\.conv_norm_out\.", ".norm_out."),
            (r"\.conv_shortcut\.", ".nin_shortcut."),
        ]:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", new)
        if m:
            kind = "block" if m[2] == "resnets" else "upsample"
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.{kind}.{m[3]}"
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$", new)
        if m:
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
        out[new] = value
    return out


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, value in flat_a:
        np.testing.assert_array_equal(value, flat_b[path], err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("naming", ["old_linear", "old_conv", "new_conv", "ldm", "ldm_prefixed"])
def test_all_checkpoint_namings_load_identically(reduced, naming):
    vae, state_dict = reduced["vae"], reduced["state_dict"]
    levels = len(vae.block_out_channels)
    variant = {
        "old_linear": lambda: _old_diffusers_names(state_dict, conv_shaped=False),
        "old_conv": lambda: _old_diffusers_names(state_dict, conv_shaped=True),
        "new_conv": lambda: {k: (v[:, :, None, None] if ".attentions.0.to_" in k and k.endswith("weight") else v)
                             for k, v in state_dict.items()},
        "ldm": lambda: _ldm_names(state_dict, levels),
        "ldm_prefixed": lambda: {**{f"first_stage_model.{k}": v for k, v in _ldm_names(state_dict, levels).items()},
                                 "model.diffusion_model.out.0.weight": np.zeros(3, np.float32)},
    }[naming]()
    _assert_same_params(convert.vae_params_from_torch(vae, variant), reduced["params"])


def test_round_trip_to_diffusers_names(reduced, tmp_path):
    vae, state_dict = reduced["vae"], reduced["state_dict"]
    back = vae_params_to_torch(vae, reduced["params"])
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    path = tmp_path / "vae.safetensors"
    convert.save_state_dict(path, back)
    _assert_same_params(load_vae_params(vae, path), reduced["params"])


def test_full_sd_vae_converts_every_key(full_config):
    """All 248 keys of the released SD VAE, shapes only (nothing full-size is allocated)."""
    vae = models.build_vae(**full_config["effective_config"])
    shapes = {k: tuple(v) for k, v in full_config["state_dict_shapes"].items()}
    specs = vae_torch_key_specs(vae)
    assert {s.torch_key: s.torch_shape for s in specs} == shapes
    assert sum(math.prod(s.flax_shape) for s in specs) == full_config["param_count"] == 83_653_863
    encoder = sum(math.prod(s.flax_shape) for s in specs if s.torch_key.startswith(("encoder.", "quant_conv.")))
    assert encoder == full_config["param_count_encoder_incl_quant_conv"]
    assert models.info.count_params(vae) == full_config["param_count"]
    # The original-LDM naming of the same checkpoint maps onto exactly these keys too.
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # zero-stride views
    ldm = diffusers_state_dict(_ldm_names(zeros, len(vae.block_out_channels)), len(vae.block_out_channels))
    check_state_dict(specs, ldm, "SD VAE")
    check_state_dict(specs, diffusers_state_dict(_old_diffusers_names(zeros, True), 4), "SD VAE")


def test_build_vae_defaults_are_the_sd_vae(full_config):
    vae = models.build_vae()
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                 "scaling_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        assert getattr(vae, name) == full_config["effective_config"][name], name
    assert list(vae.block_out_channels) == full_config["effective_config"]["block_out_channels"]


# ----------------------------------------------------------------------------- bad input


def test_wrong_architecture_lists_keys(reduced, full_config):
    sd_vae = models.build_vae(**full_config["effective_config"])
    with pytest.raises(ConversionError) as err:
        convert.vae_params_from_torch(sd_vae, reduced["state_dict"])
    message = str(err.value)
    assert "does not fit AutoencoderKL(block_out_channels=(128, 256, 512, 512)" in message
    assert "wrong shape" in message and "decoder.conv_in.weight: got" in message

    vae, state_dict = reduced["vae"], dict(reduced["state_dict"])
    del state_dict["decoder.conv_out.bias"]
    state_dict["decoder.extra_layer.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"(?s)decoder\.conv_out\.bias.*decoder\.extra_layer\.weight"):
        convert.vae_params_from_torch(vae, state_dict)


def test_mixed_attention_namings_are_refused(reduced):
    vae, state_dict = reduced["vae"], reduced["state_dict"]
    if not vae.mid_block_add_attention:
        pytest.skip("fixture VAE has no attention")
    key = "encoder.mid_block.attentions.0.to_q.weight"
    mixed = {**state_dict, key.replace("to_q", "query"): state_dict[key]}
    with pytest.raises(ConversionError, match="two weights"):
        convert.vae_params_from_torch(vae, mixed)


def test_missing_file_is_a_clear_error(reduced, tmp_path):
    missing = tmp_path / "sd-vae-ft-ema.safetensors"
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema.safetensors"):
        load_vae_params(reduced["vae"], missing)


def test_wrong_input_shapes_are_clear_errors(reduced):
    vae, params, io = reduced["vae"], reduced["params"], reduced["io"]
    with pytest.raises(ValueError, match="NHWC"):
        vae.apply({"params": params}, io["x"], method="encode")  # NCHW as stored
    with pytest.raises(ValueError, match="latents"):
        # One channel more than the latents have (images may have as many channels as latents).
        vae.apply({"params": params}, np.zeros((1, 2, 2, vae.latent_channels + 1), np.float32), method="decode")


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="norm_num_groups"):
        models.build_vae(block_out_channels=(32, 48), norm_num_groups=32)
    with pytest.raises(ValueError, match="act_fn"):
        models.build_vae(act_fn="gelu")
    with pytest.raises(ValueError, match="no argument 'num_layers'"):
        models.build_vae(num_layers=3)
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        models.build_vae(up_block_types=["AttnUpDecoderBlock2D"] * 4)


# ----------------------------------------------------------------------------- sharding

_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from udit_jax import models, convert, parallel
from udit_jax.models.vae import make_decode_fn, make_encode_fn, decode_latents
fixtures = sys.argv[1]
config = json.load(open(f"{fixtures}/manifest.json"))["vae_reduced"]["effective_config"]
vae = models.build_vae(**config)
params = convert.load_state_dict(f"{fixtures}/vae_reduced_state_dict.npz")
params = convert.vae_params_from_torch(vae, params)
x = np.load(f"{fixtures}/vae_reduced_io.npz")["x"].transpose(0, 2, 3, 1)
mesh = parallel.make_mesh()
encode, decode = make_encode_fn(vae, mesh), make_decode_fn(vae, mesh)
batch = np.concatenate([x, x[:, ::-1]] * 4)  # 8 * len(x) images: divisible by 8
result = {"devices": jax.device_count()}
for name, images in (("divisible", batch), ("padded", x)):
    mean, logvar = encode(params, images)
    ref_mean, ref_logvar = vae.apply({"params": params}, images, method="encode")
    decoded = decode(params, mean)
    ref_decoded = decode_latents(vae, params, mean)
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(1.0, np.abs(np.asarray(b)).max()))
    result[name] = dict(
        mean_devices=len(mean.sharding.device_set), shape=list(mean.shape), ref_shape=list(ref_mean.shape),
        errors=[rel(mean, ref_mean), rel(logvar, ref_logvar), rel(decoded, ref_decoded)])
print("RESULT" + json.dumps(result))
"""


def test_sharded_encode_decode_on_8_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(FIXTURES)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["devices"] == 8
    for name in ("divisible", "padded"):
        r = result[name]
        assert r["shape"] == r["ref_shape"], (name, r)
        assert max(r["errors"]) <= REL, (name, r)
    assert result["divisible"]["mean_devices"] == 8
