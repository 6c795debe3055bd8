"""U-DiT parity with the official PyTorch code (fixtures), conversion, statistics, variants."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import traverse_util

from conftest import FIXTURES, assert_close_rel, load_npz, random_params, xla_flags
from udit_jax import convert, hlo_cost, models
from udit_jax.convert import common
from udit_jax.models import layers, udit
from udit_jax.models.udit import STAGES, fuse_ffn_params, pixel_shuffle, pixel_unshuffle

nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def reduced():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    model = models.build_model("U-DiT", **manifest["udit_reduced"]["config"])
    state_dict = load_npz("udit_reduced_state_dict.npz")
    params = convert.params_from_torch(model, state_dict)
    return model, state_dict, params, load_npz("udit_reduced_io.npz")


@pytest.fixture(scope="module")
def fused(reduced):
    model, _, params, _ = reduced
    return model.inference_form(), fuse_ffn_params(params)


def run(model, params, *args, **kwargs):
    """model.apply under jit (tests run much faster compiled than op by op)."""
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


# ----------------------------------------------------------------------------- outputs
def test_training_form_output_matches_official(reduced):
    model, _, params, io = reduced
    out = run(model, params, nhwc(io["x"]), io["t"], io["y"])
    assert_close_rel(out, nhwc(io["out_unfused"]), 1e-5, "out_unfused")


def test_fused_output_matches_official_eval(reduced, fused):
    _, _, _, io = reduced
    model_f, params_f = fused
    out = run(model_f, params_f, nhwc(io["x"]), io["t"], io["y"])
    assert_close_rel(out, nhwc(io["out"]), 1e-5, "out (eval, fused)")


def test_forward_with_cfg_matches_official(reduced, fused):
    _, _, _, io = reduced
    model_f, params_f = fused
    out = run(model_f, params_f, nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"],
              float(io["cfg_scale"]), method="forward_with_cfg")
    assert_close_rel(out, nhwc(io["out_cfg"]), 1e-5, "out_cfg")
    raw = run(model_f, params_f, nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"])
    assert_close_rel(raw, nhwc(io["out_cfg_raw"]), 1e-5, "out_cfg_raw")


def test_cfg_all_channels_option(reduced):
    model, _, params, io = reduced
    x, t, y, s = nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"], float(io["cfg_scale"])
    half = x[: len(x) // 2]
    raw = np.asarray(run(model, params, np.concatenate([half, half]), t, y))
    cond, uncond = np.split(raw, 2)
    expected = np.concatenate([uncond + s * (cond - uncond)] * 2)
    out = run(model.clone(cfg_channels=None), params, x, t, y, s, method="forward_with_cfg")
    assert_close_rel(out, expected, 1e-5, "all-channel cfg")


# ----------------------------------------------------------------------------- activations
def _module_path(name: str) -> tuple[str, ...]:
    parts, out, i = name.split("."), [], 0
    while i < len(parts):
        if parts[i] in STAGES:
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def test_every_submodule_activation_matches_official(reduced, fused):
    _, _, _, io = reduced
    model_f, params_f = fused
    acts = load_npz("udit_reduced_activations.npz")
    _, state = run(model_f, params_f, nhwc(io["x"]), io["t"], io["y"],
                   capture_intermediates=True, mutable=["intermediates"])
    captured = traverse_util.flatten_dict(state["intermediates"])
    get = lambda path: np.asarray(captured[path + ("__call__",)][0])
    checked = 0
    for key, ref in acts.items():
        module, kind = key.split("@")
        if kind != "out" or "freqs_cis" in module:
            continue
        path = _module_path(module)
        if path[-1] == "downsampler":  # conv + shortcut, then the 4-way split
            x_in = nhwc(acts[module.rsplit(".", 1)[0] + "@in0"])
            conv_out = get(path[:-1] + ("downsampler_layer",))
            f = int(round(math.sqrt(ref.shape[1])))
            ours = np.asarray(udit.polyphase_split(jnp.asarray(conv_out + x_in), f))
            assert_close_rel(ours, ref, 1e-5, key)
        elif path[0] in ("down1_2", "down2_3"):
            assert_close_rel(pixel_unshuffle(get(path)), nhwc(ref), 1e-5, key)
        elif path[0] in ("up3_2", "up2_1"):
            assert_close_rel(pixel_shuffle(get(path)), nhwc(ref), 1e-5, key)
        else:
            ours = get(path)
            assert_close_rel(ours, nhwc(ref) if ref.ndim == 4 else ref, 1e-5, key)
        checked += 1
    n_blocks = sum(json.loads((FIXTURES / "manifest.json").read_text())["udit_reduced"]["config"]["depth"])
    assert checked >= 15 + n_blocks * 9


def test_submodules_from_official_inputs(reduced, fused):
    """Blocks, attention and FFNs fed the recorded official inputs (localised checks)."""
    model_f, params_f = fused
    acts = load_npz("udit_reduced_activations.npz")
    widths = dict(zip(STAGES, model_f.stage_widths))
    for key in acts:
        module, kind = key.split("@")
        if kind != "in0":
            continue
        path = _module_path(module)
        stage = path[0].rsplit("_", 1)[0]
        if stage not in STAGES:
            continue
        d, f = widths[stage], model_f.down_factors[STAGES.index(stage)]
        x_in = nhwc(acts[key])
        p = params_f
        for part in path:
            p = p[part]
        if len(path) == 1:
            block = udit.UDiTBlock(d, model_f.num_heads, model_f.mlp_ratio, f, model_f.ffn_type,
                                   model_f.rep, True, _attn_kwargs(model_f))
            out = run(block, p, x_in, acts[module + "@in1"])
        elif path[-1].startswith("attn"):
            attn = udit.DownsampledAttention(d, model_f.num_heads, f, **_attn_kwargs(model_f))
            out = run(attn, p, x_in)
        else:
            out = run(udit.ConvFeedForward(d, udit.ffn_hidden(d, model_f.mlp_ratio)), p, x_in)
        assert_close_rel(out, nhwc(acts[module + "@out"]), 1e-5, module)


def _attn_kwargs(m):
    return dict(attn_type=m.attn_type, posemb_type=m.posemb_type, downsampler=m.downsampler,
                down_shortcut=m.down_shortcut, attn_downsample=m.attn_downsample)


def test_rope_table_matches_official(reduced):
    acts = load_npz("udit_reduced_activations.npz")
    for key in acts:
        if key.endswith("freqs_cis@real"):
            real, imag = acts[key], acts[key.replace("@real", "@imag")]
            n, half = real.shape
            angles = udit.rope2d_angles(n, 2 * half)
            np.testing.assert_allclose(np.cos(angles), real, atol=2e-6, err_msg=key)
            np.testing.assert_allclose(np.sin(angles), imag, atol=2e-6, err_msg=key)


def test_rope_rotates_pairs_stored_deinterleaved():
    """apply_rope is the official pairwise rotation (a complex multiply of each channel pair)
    on channels stored as [reals | imaginaries] of each head: the same permutation for
    queries and keys, so the logits are the official ones."""
    n, heads, hd = 16, 2, 8
    angles = udit.rope2d_angles(n, hd)
    q, k = (np.asarray(jax.random.normal(jax.random.key(i), (3, n, heads, hd))) for i in (0, 1))
    rotate = lambda x: (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[:, None, :]  # noqa: E731
    interleaved = lambda z: np.stack([z.real, z.imag], axis=-1).reshape(z.shape[:-1] + (-1,))  # noqa: E731
    order = np.r_[0:hd:2, 1:hd:2]
    for x in (q, k):
        np.testing.assert_allclose(udit.apply_rope(x[..., order], angles),
                                   interleaved(rotate(x))[..., order], atol=1e-5)
    logits = np.einsum("bqhd,bkhd->bhqk", udit.apply_rope(q[..., order], angles),
                       udit.apply_rope(k[..., order], angles))
    want = np.einsum("bqhd,bkhd->bhqk", interleaved(rotate(q)), interleaved(rotate(k)))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-4)


def test_rope_rotates_in_the_compute_dtype():
    """bfloat16 q, k are rotated in bfloat16 (XLA:TPU then keeps no float32 copy of them,
    test_compile.py): within a few bfloat16 roundings of the float32 rotation of the same
    values, and with the pairs' norms kept as closely."""
    n, heads, hd = 64, 4, 24
    angles = udit.rope2d_angles(n, hd)
    x = jax.random.normal(jax.random.key(0), (2, n, heads, hd)).astype(jnp.bfloat16)
    got = udit.apply_rope(x, angles)
    want = np.asarray(udit.apply_rope(x.astype(jnp.float32), angles))
    assert got.dtype == jnp.bfloat16
    pair_norm = lambda a: np.hypot(a[..., :hd // 2], a[..., hd // 2:])  # noqa: E731
    got32, x32 = np.asarray(got, np.float32), np.asarray(x, np.float32)
    bound = 4 * 2.0 ** -8 * np.concatenate([pair_norm(want)] * 2, axis=-1)
    np.testing.assert_array_less(np.abs(got32 - want), bound + 1e-6)
    np.testing.assert_allclose(pair_norm(got32), pair_norm(x32), rtol=4 * 2.0 ** -8)


@pytest.mark.parametrize("rope_heads", [None, 3])
def test_qkv_is_the_official_linear_with_q_and_k_deinterleaved(rope_heads):
    """Params as dense(3d) (names, shapes, initial values); outputs x @ kernel + bias split
    in three, each head's q and k channels de-interleaved when RoPE follows."""
    d, hd = 12, 4
    x = jax.random.normal(jax.random.key(0), (2, 5, d))
    proj = udit.DeinterleavedQKV(d, rope_heads)
    params = proj.init(jax.random.key(1), x)["params"]
    reference = layers.dense(3 * d, ("embed", "mlp"), name="to_qkv", dtype=jnp.float32)
    want_params = reference.init(jax.random.key(1), x)["params"]
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(nn.unbox(params[name]), nn.unbox(want_params[name]))
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape),
                          nn.unbox(params))   # a non-zero bias
    full = np.asarray(x @ params["kernel"] + params["bias"])
    order = np.arange(d) if rope_heads is None else (
        np.arange(rope_heads)[:, None] * hd + np.r_[0:hd:2, 1:hd:2]).reshape(-1)
    want_q, want_k, want_v = np.split(full, 3, axis=-1)
    # One matmul; three (layers.qkv_projection: TPUs); one again (v6e).
    forms = (("cpu", None), ("tpu", None), ("tpu", "TPU v6 lite"))
    for form in forms:
        with models.forms_for(*form):
            q, k, v = proj.apply({"params": params}, x)
        np.testing.assert_allclose(q, want_q[..., order], atol=1e-5)
        np.testing.assert_allclose(k, want_k[..., order], atol=1e-5)
        np.testing.assert_allclose(v, want_v, atol=1e-5)   # v keeps the official order

    def dots(platform, kind):
        with models.forms_for(platform, kind):
            lowered = jax.jit(lambda p, x: proj.apply({"params": p}, x)).trace(params, x).lower(
                lowering_platforms=(platform,))
        return lowered.as_text().count("stablehlo.dot_general")
    assert [dots(*form) for form in forms] == [1, 3, 1]


def test_attention_slices_no_query_or_key_with_a_stride():
    """RoPE's pairs are split by the projection's weights, not by strided slices of every
    query and key (on TPUs standalone copies, forward and backward)."""
    attn = udit.DownsampledAttention(8, 2, 2, attn_type="v2", posemb_type="rope2d",
                                     downsampler="dwconv5", down_shortcut=1)
    x = jnp.zeros((1, 8, 8, 8))
    params = attn.init(jax.random.key(0), x)

    def strided(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "slice" and any(s not in (None, 1) for s in
                                                     eqn.params.get("strides") or ()):
                yield eqn
            for value in eqn.params.values():   # inside jit, custom_vjp, cond
                for inner in value if isinstance(value, tuple) else (value,):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        yield from strided(inner)

    grad = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(attn.apply(p, x) ** 2)))(params)
    assert not list(strided(grad.jaxpr))


# ----------------------------------------------------------------------------- fusion
def test_fused_ffn_tensors_match_official(reduced, fused):
    model_f, params_f = fused
    official = load_npz("udit_reduced_fused_ffn.npz")
    ours = convert.params_to_torch(model_f, params_f)
    for key, ref in official.items():
        np.testing.assert_allclose(ours[key], ref, atol=2e-6 * max(1, np.abs(ref).max()), err_msg=key)


def test_fused_state_dict_loads_into_inference_form(reduced, fused):
    _, state_dict, _, io = reduced
    model_f, _ = fused
    sd = {k: v for k, v in state_dict.items() if ".mlp1." not in k and ".mlp2." not in k}
    sd.update(load_npz("udit_reduced_fused_ffn.npz"))
    params = convert.params_from_torch(model_f, sd)
    out = run(model_f, params, nhwc(io["x"]), io["t"], io["y"])
    assert_close_rel(out, nhwc(io["out"]), 1e-5, "out from official fused tensors")


def test_fusion_is_pure_and_idempotent_in_effect(reduced):
    model, _, params, _ = reduced
    before = jax.tree_util.tree_map(np.array, params)
    once, twice = fuse_ffn_params(params), fuse_ffn_params(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # input untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, once, twice)     # no hidden state


# ----------------------------------------------------------------------------- conversion
def test_state_dict_round_trip_is_bit_exact(reduced):
    model, state_dict, params, _ = reduced
    back = convert.params_to_torch(model, params)
    assert set(back) == set(state_dict)
    for k, v in state_dict.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["U-DiT-S", "U-DiT-B", "U-DiT-L"])
def test_full_config_keys_shapes_and_counts(name):
    official = json.loads((FIXTURES / "udit_full_configs.json").read_text())[name]
    model = models.build_model(name)
    specs = convert.torch_key_specs(model)
    ours = {s.torch_key: s.torch_shape for s in specs}
    theirs = {k: tuple(v) for k, v in official["state_dict_shapes"].items()}
    assert ours == theirs
    # The same check params_from_torch runs, on zero-stride stand-ins (no memory).
    common.check_state_dict(specs, {k: np.broadcast_to(np.float32(0), s) for k, s in theirs.items()}, name)
    info = models.model_info(name)
    assert info["params"] == official["param_count"]
    assert info["params_fused"] == official["param_count_inference_fused"]
    assert info["gmacs"] == pytest.approx(official["gmacs_torchprofile_train_form"], abs=1e-5)
    assert info["gmacs_fused"] == pytest.approx(official["gmacs_torchprofile_eval_fused"], abs=1e-5)
    # The paper's table (params in inference form, "GFLOPs" = fused GMACs).
    params_fused, gflops = PAPER_NUMBERS[name]
    assert (info["params_fused"], round(info["gmacs_fused"], 2)) == (params_fused, gflops)


PAPER_NUMBERS = {"U-DiT-S": (52_045_240, 6.04), "U-DiT-B": (204_425_064, 22.22),
                 "U-DiT-L": (810_188_488, 85.00)}


def test_paper_numbers_at_512():
    assert round(models.model_info("U-DiT-B", input_size=64)["gmacs_fused"], 1) == 106.7


def test_wrong_model_state_dict_lists_keys(reduced):
    _, state_dict, _, _ = reduced
    config = json.loads((FIXTURES / "manifest.json").read_text())["udit_reduced"]["config"]
    # The fixture's model with the last block of its first non-empty stage left out.
    stages = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
    depth = list(config["depth"])
    stage = next(i for i, d in enumerate(depth) if d > 0)
    depth[stage] -= 1
    other = models.build_model("U-DiT", **{**config, "depth": tuple(depth)})
    with pytest.raises(convert.ConversionError, match=rf"unexpected keys: {stages[stage]}\.{depth[stage]}\."):
        convert.params_from_torch(other, state_dict)
    wider = other.clone(depth=tuple(config["depth"]), hidden_size=2 * config["hidden_size"])
    with pytest.raises(convert.ConversionError, match="wrong shape"):
        convert.params_from_torch(wider, state_dict)


# ----------------------------------------------------------------------------- building blocks
def test_pixel_shuffles_use_pytorch_channel_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    out = np.asarray(pixel_unshuffle(jnp.asarray(x)))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(out[..., c * 4 + 2 * i + j], x[:, i::2, j::2, c])
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(out))), x)


def test_polyphase_split_groups_strided_subgrids():
    x = np.arange(2 * 6 * 6 * 5, dtype=np.float32).reshape(2, 6, 6, 5)
    groups = np.asarray(udit.polyphase_split(jnp.asarray(x), 2))
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(groups[:, 2 * i + j], x[:, i::2, j::2].reshape(2, 9, 5))
    np.testing.assert_array_equal(np.asarray(udit.polyphase_merge(jnp.asarray(groups), 2, 6, 6)), x)


# ----------------------------------------------------------------------------- variants
TINY = dict(input_size=8, in_channels=3, hidden_size=16, depth=(1, 1, 1, 1, 1), num_heads=2,
            mlp_ratio=2, num_classes=5)
OFFICIAL = dict(attn_type="v2", posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)
VARIANTS = {
    "vanilla": dict(),
    "basic_ffn": dict(ffn_type="basic", attn_type="v2"),
    "rep0": dict(rep=0, downsampler="dwconv3", posemb_type="rope2d"),
    "kv_downsampling": dict(attn_downsample="kv", downsampler="dwconv5", down_shortcut=1, posemb_type="rope2d"),
    "full_attention": dict(attn_downsample="none", attn_type="v2", posemb_type="rope2d"),
}
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
T, Y = jnp.array([3, 900]), jnp.array([0, 4])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_run_and_differ_from_official(variant):
    model = models.build_model("U-DiT", **TINY, **VARIANTS[variant])
    params = random_params(model)
    out = np.asarray(run(model, params, X, T, Y))
    assert out.shape == (2, 8, 8, 6) and np.isfinite(out).all()
    assert np.abs(out).max() > 1e-3
    assert model.count_macs() > 0


def test_init_gives_identity_blocks_zero_output_and_gradients():
    # adaLN-Zero: every sublayer and the final layer start at zero, so the output is exactly 0.
    model = models.build_model("U-DiT", **{**TINY, "depth": (1, 0, 0, 0, 1)}, **OFFICIAL)
    params = jax.jit(lambda k: models.init_params(model, k))(jax.random.key(0))
    loss = lambda p: jnp.sum(model.apply({"params": p}, X, T, Y))
    out, grads = jax.jit(lambda p: (model.apply({"params": p}, X, T, Y), jax.grad(loss)(p)))(params)
    np.testing.assert_array_equal(out, 0.0)
    grads = traverse_util.flatten_dict(grads)
    assert np.abs(grads[("final_layer", "out_proj", "kernel")]).max() > 0
    _check_init_rules(traverse_util.flatten_dict(params))


def _check_init_rules(flat):
    def bound(fan_in, fan_out):
        return math.sqrt(6 / (fan_in + fan_out))
    stem = flat[("x_embedder", "kernel")]  # xavier on (out, in*9): fans 27 and 16
    assert np.abs(stem).max() <= bound(27, 16) and np.abs(stem).max() > 0.8 * bound(27, 16)
    dw = flat[("encoder_level_1_0", "attn1", "downsampler_layer", "kernel")]  # (5,5,1,16): fans 25, 400
    assert np.abs(dw).max() <= bound(25, 400) and np.abs(dw).max() > 0.8 * bound(25, 400)
    qkv = flat[("encoder_level_1_0", "attn2", "to_qkv", "kernel")]  # (16, 48)
    assert np.abs(qkv).max() <= bound(16, 48) and np.abs(qkv).max() > 0.8 * bound(16, 48)
    for path, value in flat.items():
        zero_init = (path[-1] == "bias" or "adaLN_modulation" in path[-2]
                     or path[:2] == ("final_layer", "out_proj"))
        if zero_init and not (path[0].startswith("t_embedder") and path[-1] == "kernel"):
            np.testing.assert_array_equal(value, 0, err_msg=str(path))
        if path[-1] == "logit_scale":
            np.testing.assert_allclose(value, math.log(10.0), rtol=1e-6)
    table = flat[("y_embedder_2", "embedding_table")]
    assert table.shape == (6, 32) and 0.01 < table.std() < 0.03
    assert 0.01 < flat[("t_embedder_3", "mlp_0", "kernel")].std() < 0.03


def test_down_factor_one_equals_full_attention():
    base = models.build_model("U-DiT", **TINY, **OFFICIAL)
    params = random_params(base)
    a = run(base.clone(down_factor=1), params, X, T, Y)
    b = run(base.clone(attn_downsample="none"), params, X, T, Y)
    np.testing.assert_allclose(a, b, atol=1e-6)
    c = run(base, params, X, T, Y)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4  # downsampling does change the output


def test_patch_size_runs_the_network_on_unshuffled_patches():
    # patch_size=2 at 16x16x3 is the patch-1 network at 8x8x12 between a pixel-unshuffle and a
    # pixel-shuffle, with the same parameters.
    patched = models.build_model("U-DiT", **{**TINY, "input_size": 16}, **OFFICIAL, patch_size=2)
    inner = models.build_model("U-DiT", **{**TINY, "in_channels": 12}, **OFFICIAL)
    params = random_params(patched)
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    out = run(patched, params, x, T, Y)
    want = pixel_shuffle(run(inner, params, pixel_unshuffle(x), T, Y), 2)
    assert out.shape == (2, 16, 16, 6)
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert patched.stage_sizes == (8, 4, 2, 4, 8)
    assert patched.count_macs() < models.build_model("U-DiT", **{**TINY, "input_size": 16}, **OFFICIAL).count_macs()


def test_depthwise_taps_equal_grouped_convolution():
    """Values and both gradients (the hand-written VJP) against lax's grouped convolution, for
    non-square sizes, and heights that leave the kernel gradient's four-row unrolled loop a
    remainder (7, 6) or are below four rows (3)."""
    grouped = lambda x, kernel: jax.lax.conv_general_dilated(   # noqa: E731
        x, kernel, (1, 1), "SAME", feature_group_count=x.shape[-1],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    for h, w, c in ((7, 9, 6), (6, 5, 16), (3, 8, 5)):
        x = jax.random.normal(jax.random.key(h), (2, h, w, c))
        g = jax.random.normal(jax.random.key(h + 1), (2, h, w, c))
        for k in (1, 3, 5):
            kernel = jax.random.normal(jax.random.key(k), (k, k, 1, c))
            np.testing.assert_allclose(layers.depthwise_taps(x, kernel), grouped(x, kernel), atol=1e-5)
            grads = lambda fn: jax.jit(jax.grad(   # noqa: E731
                lambda x, kernel: jnp.sum(fn(x, kernel) * g), argnums=(0, 1)))(x, kernel)
            for got, want in zip(grads(layers.depthwise_taps), grads(grouped)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # bfloat16 activations: gradients in their dtypes, the kernel's summed in float32.
    x16 = x.astype(jnp.bfloat16)
    gx, gk = jax.grad(lambda x, k: jnp.sum(layers.depthwise_taps(x, k).astype(jnp.float32) * g),
                      argnums=(0, 1))(x16, kernel)
    assert gx.dtype == jnp.bfloat16 and gk.dtype == jnp.float32
    want = jax.grad(lambda k: jnp.sum(grouped(x16.astype(jnp.float32), k) * g))(kernel)
    np.testing.assert_allclose(gk, want, rtol=2e-2, atol=2e-1)


def test_depthwise_conv_lowers_per_platform():
    """The one depthwise conv lowers (as --mode=compile lowers for a TPU from a CPU host) to
    shifted multiply-adds on CPUs and TPUs, with the kernel gradient as a scan of multiply-adds
    on CPUs and as the grouped convolution's kernel gradient on TPUs, and to lax's grouped
    convolution on GPUs. The CPU gradients equal the taps', and the TPU kernel gradient equals
    the CPU one."""
    x = jax.random.normal(jax.random.key(3), (2, 7, 9, 6))
    kernel = jax.random.normal(jax.random.key(5), (5, 5, 1, 6))
    grad = jax.grad(lambda x, k: jnp.sum(layers.depthwise_conv(x, k) ** 2), argnums=(0, 1))
    want = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.depthwise_taps(x, k) ** 2),
                            argnums=(0, 1)))(x, kernel)
    for got, expected in zip(jax.jit(grad)(x, kernel), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    g = jax.random.normal(jax.random.key(6), x.shape)
    np.testing.assert_allclose(layers._grouped_kernel_grad(x, g, 5),
                               layers._taps_kernel_grad(x, g, 5), rtol=1e-5, atol=1e-4)

    def lowered(fn, platform):
        return jax.jit(fn).trace(x, kernel).lower(lowering_platforms=(platform,)).as_text()

    forward = lambda x, k: layers.depthwise_conv(x, k)   # noqa: E731
    for platform in ("cpu", "tpu"):
        assert "feature_group_count = 6" not in lowered(forward, platform)
        assert lowered(forward, platform).count("stablehlo.multiply") >= 25
    assert "feature_group_count = 6" in lowered(forward, "cuda")
    # Kernel gradients: a scan (while loop) on CPUs, a batch-grouped convolution on TPUs.
    assert "stablehlo.while" in lowered(grad, "cpu") and "batch_group_count" not in lowered(grad, "cpu")
    assert "batch_group_count = 6" in lowered(grad, "tpu") and "stablehlo.while" not in lowered(grad, "tpu")


_SHARDED_DEPTHWISE_GRAD = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from udit_jax import hlo_cost
from udit_jax.models import layers
mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
x, g = (jax.random.normal(jax.random.key(i), (4, 8, 6, 5)) for i in (1, 2))
kernel = jax.random.normal(jax.random.key(3), (5, 5, 1, 5))
grad = jax.jit(jax.grad(lambda x, k, g: jnp.sum(layers.depthwise_conv(x, k) * g), argnums=(0, 1)))
images = NamedSharding(mesh, P("data"))
xs, gs = jax.device_put(x, images), jax.device_put(g, images)
kinds = [c["kind"] for c in hlo_cost.collectives(grad.lower(xs, kernel, gs).compile().as_text())]
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grad(xs, kernel, gs), grad(x, kernel, g)))
print(json.dumps({"kinds": kinds, "err": err}))
"""


def test_depthwise_kernel_gradient_keeps_the_batch_sharded():
    """With the batch split over two (simulated) CPU devices, the depthwise conv's gradients
    need one all-reduce (the kernel gradient's sum over images) and equal the one-device ones.
    Guards the CPU kernel gradient's scan: slicing it by image made XLA gather the whole
    batch onto every device, which then repeated the other's work (the demo's train step)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    out = subprocess.run([sys.executable, "-c", _SHARDED_DEPTHWISE_GRAD], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["kinds"] == ["all-reduce"], report
    assert report["err"] < 1e-4, report


def _residual_chain_grad_hlo(n_blocks: int, dot) -> str:
    """XLA:CPU's compiled gradient of n adaLN-modulated residual blocks (attention-like
    projection + GELU MLP, each gated), the pattern of a DiT/U-DiT stage, at toy size."""
    def ln(x):
        m = x.mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-6)

    def loss(params, x, c):
        for p in params:
            s1, b1, g1, s2, b2, g2 = jnp.split((c @ p["ada"])[:, None, :], 6, -1)
            x = x + g1 * dot(ln(x) * (1 + s1) + b1, p["wo"])
            x = x + g2 * dot(jax.nn.gelu(dot(ln(x) * (1 + s2) + b2, p["w1"])), p["w2"])
        return jnp.sum(x ** 2)
    d = 8
    params = [{"ada": jnp.full((d, 6 * d), 0.02), "wo": jnp.eye(d) * 0.5,
               "w1": jnp.full((d, 2 * d), 0.05), "w2": jnp.full((2 * d, d), 0.05)}] * n_blocks
    return jax.jit(jax.grad(loss)).lower(params, jnp.ones((2, 16, d)), jnp.ones((2, d))).compile().as_text()


def _largest_transposing_fusion(hlo: str) -> int:
    """The most instructions in one fused computation that transposes or copies (changes
    the layout of) its result, in a compiled HLO text."""
    computations, _ = hlo_cost._computations(hlo)
    return max([sum("=" in line for line in lines) for name, lines in computations.items()
                if name.startswith("fused_computation")
                and any(re.search(r"\s(transpose|copy)\(", line) for line in lines)] + [0])


def test_matmul_values_gradients_and_lowering():
    """`layers.matmul` (every dense and 1x1 layer) equals dot_general in value and both
    gradients, f32 and bf16; on CPUs its weight gradient does not pull the residual stream's
    backward into a fusion per weight (the fused chain stays the same size however many blocks
    follow); on TPUs the program is autodiff's."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
    w = jax.random.normal(jax.random.key(1), (6, 4))
    plain = layers._contract_last
    # float32: the weight gradient sums 30 products of size ~1-3 in another order, so
    # rounding reaches a few 1e-6 (seen: 1.1e-6 on an AVX2 host); a wrong gradient is O(1).
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        xs, ws = x.astype(dtype), w.astype(dtype)
        np.testing.assert_allclose(np.asarray(layers.matmul(xs, ws), np.float32),
                                   np.asarray(plain(xs, ws), np.float32), rtol=tol, atol=tol)
        loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b).astype(jnp.float32))))  # noqa: E731
        got = jax.grad(loss(layers.matmul), argnums=(0, 1))(xs, ws)
        want = jax.grad(loss(plain), argnums=(0, 1))(xs, ws)
        for g, e in zip(got, want):
            assert g.dtype == e.dtype == dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32),
                                       rtol=tol, atol=tol)
    # CPU: no transposing copy recomputes the residual stream's backward, so the largest one
    # stays small however many blocks there are (autodiff's form on jax 0.10.2: 206
    # instructions with 3 blocks, 422 with 6).
    assert _largest_transposing_fusion(_residual_chain_grad_hlo(6, layers.matmul)) <= 30
    def contractions(platform, f):
        """The lowered gradient's dot_generals and transposes, SSA names dropped."""
        text = jax.jit(jax.grad(loss(f), argnums=(0, 1))).trace(x, w).lower(
            lowering_platforms=(platform,)).as_text()
        return sorted(re.sub(r"%[\w#]+", "%", line.strip()) for line in text.splitlines()
                      if "stablehlo.dot_general" in line or "stablehlo.transpose" in line)
    assert contractions("tpu", layers.matmul) == contractions("tpu", plain)
    assert contractions("cpu", layers.matmul) != contractions("cpu", plain)


def test_per_platform_traces_one_form_inside_forms_for():
    """layers.per_platform lowers a form per platform; inside models.forms_for(platform) it
    traces that platform's form alone (gpu: the cuda/rocm form; else the default)."""
    f = lambda x: layers.per_platform(x, cpu=lambda x: x + 1.0, tpu=lambda x: x + 2.0,  # noqa: E731
                                      cuda=lambda x: x + 3.0, default=lambda x: x + 4.0)
    x = jnp.zeros((3,))
    for platform, want in (("cpu", 1.0), ("tpu", 2.0), ("gpu", 3.0), ("rocm", 4.0)):
        with models.forms_for(platform):
            # A new function each time: jit's trace cache does not see forms_for.
            assert "cond" not in str(jax.jit(lambda x: f(x)).trace(x).jaxpr)
            assert float(f(x)[0]) == want        # run here on the CPU, whichever form
    assert "cond" in str(jax.jit(lambda x: f(x)).trace(x).jaxpr) and float(f(x)[0]) == 1.0
    lowered = lambda platform: jax.jit(f).trace(x).lower(  # noqa: E731
        lowering_platforms=(platform,)).as_text()
    assert "stablehlo.case" in lowered("tpu") and "stablehlo.case" in lowered("cpu")
    with pytest.raises(ValueError, match="forms_for\\('TPU'\\)"):
        with models.forms_for("TPU"):
            pass


def test_per_platform_takes_a_tpu_chips_form_only_for_that_chip():
    """A chip's branch (tpu_v5p=...) serves that TPU generation inside forms_for with its
    device_kind; other TPUs, a TPU of unknown kind and lowering outside forms_for take tpu=."""
    f = lambda x: layers.per_platform(x, tpu=lambda x: x + 2.0, tpu_v5p=lambda x: x + 5.0,  # noqa: E731
                                      tpu_v6e=lambda x: x + 6.0, default=lambda x: x + 4.0)
    x = jnp.zeros((3,))
    for kind, want in (("TPU v5", 5.0), ("TPU v5p", 5.0), ("TPU v5 lite", 2.0),
                       ("TPU v6 lite", 6.0), ("TPU v4", 2.0), ("TPU v7x", 2.0), (None, 2.0)):
        with models.forms_for("tpu", kind):
            assert float(f(x)[0]) == want, kind
    with models.forms_for("cpu", "TPU v5"):       # a chip's form is a TPU's only
        assert float(f(x)[0]) == 4.0
    lowered = jax.jit(f).trace(x).lower(lowering_platforms=("tpu",)).as_text()
    assert "2.000000e+00" in lowered and "5.000000e+00" not in lowered
    with pytest.raises(ValueError, match="unknown branches \\['tpu_v9'\\]"):
        layers.per_platform(x, tpu_v9=lambda x: x, default=lambda x: x)


def _bf16(a) -> np.ndarray:
    """a rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def test_matmul_at_one_bfloat16_pass_on_cpus():
    """Under jax.default_matmul_precision('bfloat16') the CPU matmul multiplies its operands
    rounded to bfloat16 and sums in float32 (as TPUs do; XLA:CPU alone would ignore the
    precision), forward and both gradients; under JAX's default it multiplies float32."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 64))
    w = jax.random.normal(jax.random.key(1), (64, 8))
    g = jax.random.normal(jax.random.key(2), (2, 3, 5, 8))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    rounded = _bf16(x) @ _bf16(w)
    assert np.abs(rounded - exact).max() > 1e-2        # the two are told apart below
    for precision, want_y in ((None, exact), ("bfloat16", rounded)):
        with jax.default_matmul_precision(precision):
            y, vjp = jax.vjp(layers.matmul, x, w)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-4)
        gx, gw = vjp(g)
        r = _bf16 if precision else (lambda a: np.asarray(a, np.float64))
        np.testing.assert_allclose(gx, r(g) @ r(w).T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(gw, r(x).reshape(-1, 64).T @ r(g).reshape(-1, 8),
                                   rtol=1e-5, atol=1e-4)
        assert gx.dtype == gw.dtype == jnp.float32


def _dot_operand_dtypes(f, *args) -> list[tuple[str, str]]:
    """The operand element types of every dot_general in f's CPU lowering (its gradient's
    too, when f is one)."""
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    return re.findall(r"stablehlo\.dot_general .*: \(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>\)",
                      text)


def test_attention_at_one_bfloat16_pass_on_cpus():
    """The CPU attention under jax.default_matmul_precision('bfloat16'): float32 in and out,
    every matmul of the forward and backward on bfloat16 operands, values and gradients
    within bfloat16 rounding of the float32 softmax's, and not equal to its float32-precision
    result."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 12, 16)) for i in range(3))
    f = lambda q, k, v: layers.attention(q, k, v, scale=0.6)  # noqa: E731
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
    assert {t for pair in _dot_operand_dtypes(grad, q, k, v) for t in pair} == {"f32"}
    full = f(q, k, v)
    with jax.default_matmul_precision("bfloat16"):
        heads_major = lambda q, k, v, s: layers.attention_heads_major(q, k, v, s, True)  # noqa: E731
        _vjps_against_softmax(heads_major, "bhsd", jnp.float32, 2e-2)
        dtypes = _dot_operand_dtypes(grad, q, k, v)
        low = f(q, k, v)
    assert len(dtypes) == 6 and {t for pair in dtypes for t in pair} == {"bf16"}
    assert low.dtype == jnp.float32
    assert 1e-4 < np.abs(np.asarray(low - full)).max() < 2e-2


def test_model_matmul_precision_reaches_every_matmul():
    """A U-DiT with matmul_precision='bfloat16', on a CPU: float32 output within bfloat16
    rounding of the float32 model's and different from it; no matmul of its forward or
    backward multiplies float32 operands (under JAX's default, all of them do)."""
    model = models.build_model("U-DiT", input_size=8, in_channels=4, num_classes=10, hidden_size=32,
                        depth=(1, 1, 1, 1, 1), num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([3, 700]), jnp.array([1, 2])
    params = random_params(model, seed=1)   # no zero-initialised output layer
    low_model = model.clone(matmul_precision="bfloat16")
    full = jax.jit(model.apply)({"params": params}, x, t, y)
    low = jax.jit(low_model.apply)({"params": params}, x, t, y)
    assert low.dtype == jnp.float32
    assert 1e-4 < np.abs(np.asarray(low - full)).max() < 5e-2 * np.abs(np.asarray(full)).max()
    loss = lambda m: (lambda p: jnp.sum(m.apply({"params": p}, x, t, y) ** 2))  # noqa: E731
    full_dtypes = _dot_operand_dtypes(jax.grad(loss(model)), params)
    low_dtypes = _dot_operand_dtypes(jax.grad(loss(low_model)), params)
    assert len(low_dtypes) == len(full_dtypes) > 20
    assert {t for pair in full_dtypes for t in pair} == {"f32"}
    assert {t for pair in low_dtypes for t in pair} == {"bf16"}


def test_attention_lowers_per_platform():
    """Heads-major matmuls for CPUs (XLA:CPU's matmul library), in-place einsums elsewhere; the
    same values."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 10, 3, 4)) for i in range(3))
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(
        jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.7, axis=-1), v)
    np.testing.assert_allclose(layers.attention(q, k, v, scale=0.7), want, rtol=1e-5, atol=1e-6)
    on = lambda platform: jax.jit(lambda q, k, v: layers.attention(q, k, v, scale=0.7)).trace(  # noqa: E731
        q, k, v).lower(lowering_platforms=(platform,)).as_text()
    # CPU: q, k, v to heads-major and the output back; elsewhere at most einsum's own
    # (transposes of [B, N, heads, hd] arrays; the softmax sums' [B, heads, N] do not count).
    moves = lambda text: len(re.findall(r"stablehlo\.transpose .*dims = \[\d+, \d+, \d+, \d+\]", text))  # noqa: E731
    assert moves(on("tpu")) <= 1 < 4 <= moves(on("cpu"))
    # Elsewhere the backward is attention_recomputed's: autodiff's 4 matmuls plus the logits
    # again and g.o (8 with the forward's 2, against 6 on CPU).
    grads = lambda platform: jax.jit(jax.grad(  # noqa: E731
        lambda q, k, v: jnp.sum(layers.attention(q, k, v, scale=0.7) ** 2), argnums=(0, 1, 2))
    ).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text().count("stablehlo.dot_general")
    assert (grads("cpu"), grads("tpu")) == (6, 8)


def test_gelu_exact_is_torchs_erf_gelu():
    """x/2 (1 + erf(x/sqrt 2)) and its derivative, against float64 (scipy), over the range
    activations take, the far negative tail included (where 1 + erf cancels in float32, as in
    torch's kernel: within 1e-6 absolute)."""
    from scipy.special import erf
    x = np.linspace(-12.0, 12.0, 20001)
    want = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    want_grad = 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(layers.gelu_exact(x32), want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu_exact))(x32), want_grad,
                               rtol=2e-6, atol=1e-6)
    assert layers.gelu_exact(x32.astype(jnp.bfloat16)).dtype == jnp.bfloat16


_ATTN_B, _ATTN_N, _ATTN_M, _ATTN_H, _ATTN_D = 2, 12, 5, 3, 4   # N != M, as U-DiT's pooled keys


def _vjps_against_softmax(attention, layout: str, dtype, tol: float):
    """attention(q, k, v, 0.6) and its VJP against autodiff of the float32 softmax, q/k/v laid
    out as `layout` ("bhsd" heads-major, "bshd" in place), sizes _ATTN_*.
    Asserts values and gradients agree in the input dtype; returns both VJP closures."""
    b, n, m, h, d = _ATTN_B, _ATTN_N, _ATTN_M, _ATTN_H, _ATTN_D
    shape = {"bhsd": lambda s: (b, h, s, d), "bshd": lambda s: (b, s, h, d)}[layout]
    q, k, v, g = (jax.random.normal(jax.random.key(i), shape(s)).astype(dtype)
                  for i, s in enumerate((n, m, m, n)))
    spec = layout.replace("s", "{}")

    def reference(q, k, v):
        logits = jnp.einsum(f"{spec.format('q')},{spec.format('k')}->bhqk", q, k,
                            preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * 0.6, axis=-1).astype(v.dtype)
        return jnp.einsum(f"bhqk,{spec.format('k')}->{spec.format('q')}", weights, v)

    got, got_vjp = jax.vjp(lambda q, k, v: attention(q, k, v, 0.6), q, k, v)
    want, want_vjp = jax.vjp(reference, q, k, v)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
    for a, e in zip(got_vjp(g), want_vjp(g)):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                                   rtol=tol, atol=tol * float(np.abs(np.asarray(e, np.float32)).max()))
    return got_vjp, want_vjp


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_attention_heads_major_equals_autodiff(dtype, tol):
    """The CPU form's values and hand-written gradients equal autodiff of the float32 softmax."""
    _vjps_against_softmax(layers.attention_heads_major, "bhsd", dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_attention_recomputed_equals_autodiff_and_keeps_no_weights(dtype, tol):
    """Values and gradients of the recomputing backward equal autodiff of the float32 softmax;
    the backward keeps no [B, heads, N, M] array."""
    got_vjp, want_vjp = _vjps_against_softmax(layers.attention_recomputed, "bshd", dtype, tol)
    weights_shape = (_ATTN_B, _ATTN_H, _ATTN_N, _ATTN_M)
    assert weights_shape not in [a.shape for a in jax.tree.leaves(got_vjp)]
    assert weights_shape in [a.shape for a in jax.tree.leaves(want_vjp)]


def test_fused_equals_unfused_on_random_weights():
    model = models.build_model("U-DiT", **TINY, **OFFICIAL)
    params = random_params(model)
    a = run(model, params, X, T, Y)
    b = run(model.inference_form(), fuse_ffn_params(params), X, T, Y)
    assert_close_rel(b, a, 1e-5, "fused vs unfused")


def test_remat_and_bfloat16():
    block = udit.UDiTBlock(16, 2, 2, 2, "rep", 1, False, _attn_kwargs(models.build_model("U-DiT", **TINY, **OFFICIAL)))
    x, c = X[..., :1].repeat(16, -1), jnp.ones((2, 16))
    params = _random_params_of(block, x, c)
    loss = lambda cls: (lambda p: jnp.mean(cls(*block_args(block)).apply({"params": p}, x, c) ** 2))
    g1 = jax.jit(jax.grad(loss(udit.UDiTBlock)))(params)
    g2 = jax.jit(jax.grad(loss(nn.remat(udit.UDiTBlock))))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
    model = models.build_model("U-DiT", **{**TINY, "depth": (1, 0, 0, 0, 1)}, **OFFICIAL)
    params = random_params(model)
    ref = run(model, params, X, T, Y)
    out = run(model.clone(dtype=jnp.bfloat16), params, X, T, Y)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * max(1.0, float(np.abs(ref).max()))
    assert run(model.clone(remat=True), params, X, T, Y).shape == ref.shape


def test_remat_recomputes_no_matmul_or_attention_on_tpu():
    """remat_policy keeps the projections' outputs and the attention's output and log-sum-exp:
    the remat'd U-DiT block's gradient, lowered for TPUs, has as many matmuls as without remat
    (plain remat recomputes them all), and the same values."""
    block = udit.UDiTBlock(16, 2, 2, 2, "rep", 1, False, _attn_kwargs(models.build_model("U-DiT", **TINY, **OFFICIAL)))
    x, c = X[..., :1].repeat(16, -1), jnp.ones((2, 16))
    params = _random_params_of(block, x, c)

    def grad(cls):
        loss = lambda p: jnp.mean(cls(*block_args(block)).apply({"params": p}, x, c) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))

    def dots(cls):
        return grad(cls).trace(params).lower(lowering_platforms=("tpu",)).as_text().count(
            "stablehlo.dot_general")

    keeps = lambda what: nn.remat(udit.UDiTBlock, policy=layers.remat_policy(what))  # noqa: E731
    kept = keeps("outputs")
    assert dots(kept) == dots(udit.UDiTBlock) < dots(nn.remat(udit.UDiTBlock))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           grad(kept)(params), grad(udit.UDiTBlock)(params))
    # The lighter settings: projections recomputed; everything recomputed (as plain remat).
    assert dots(udit.UDiTBlock) < dots(keeps("attention")) < dots(keeps("inputs")) \
        == dots(nn.remat(udit.UDiTBlock))
    with pytest.raises(ValueError, match="remat_keeps='all'"):
        layers.remat_policy("all")
    # The model field reaches the policy.
    def model_dots(what):
        model = models.build_model("U-DiT", **{**TINY, "depth": (1, 0, 0, 0, 0)}, **OFFICIAL,
                                   remat=True, remat_keeps=what)
        loss = lambda p: jnp.mean(run(model, p, X, T, Y) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).trace(random_params(model)).lower(
            lowering_platforms=("tpu",)).as_text().count("stablehlo.dot_general")
    assert model_dots("outputs") < model_dots("inputs")


def block_args(block):
    return (block.dim, block.num_heads, block.mlp_ratio, block.down_factor, block.ffn_type, block.rep,
            block.fused_ffn, block.attn_kwargs)


def _random_params_of(module, *args, seed=0):
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"])
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32), shapes)


def test_label_dropout_draws_independent_masks_per_stage():
    model = models.build_model("U-DiT", **{**TINY, "depth": (0, 0, 0, 0, 0)}, **OFFICIAL, class_dropout_prob=0.5)
    params = random_params(model)
    n = 256
    x = jnp.zeros((n, 8, 8, 3))
    t, y = jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32)
    _, state = run(model, params, x, t, y, train=True, rngs={"label_dropout": jax.random.key(3)},
                   capture_intermediates=True, mutable=["intermediates"])
    masks = []
    for k in (1, 2, 3):
        emb = np.asarray(state["intermediates"][f"y_embedder_{k}"]["__call__"][0])
        null = np.asarray(params[f"y_embedder_{k}"]["embedding_table"][model.num_classes])
        masks.append(np.all(np.isclose(emb, null), axis=-1))
    for m in masks:
        assert 0.35 < m.mean() < 0.65
    assert (masks[0] != masks[1]).any() and (masks[1] != masks[2]).any()
    # Deterministic without train=True.
    a, b = run(model, params, x[:2], t[:2], y[:2]), run(model, params, x[:2], t[:2], y[:2])
    np.testing.assert_array_equal(a, b)


def test_logical_axes_on_every_param():
    model = models.build_model("U-DiT", **TINY, **OFFICIAL)
    specs = traverse_util.flatten_dict(models.logical_axes(model))
    shapes = traverse_util.flatten_dict(nn.unbox(models.info.abstract_params(model)))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert len(spec) == len(shapes[path].shape), path
        assert all(name is None or isinstance(name, str) for name in spec), path


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = models.build_model("U-DiT", **TINY, **OFFICIAL)
    params = random_params(model)
    t, y = jnp.array([1, 2]), jnp.array([0, 1])
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\]"):
        model.apply({"params": params}, jnp.zeros((2, 16, 16, 3)), t, y)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\]"):
        model.apply({"params": params}, jnp.zeros((2, 3, 8, 8)), t, y)
    with pytest.raises(ValueError, match="unknown model name 'U-DiT-XXL'"):
        models.build_model("U-DiT-XXL")
    with pytest.raises(ValueError, match="divisible by 4"):
        models.build_model("U-DiT", **{**TINY, "input_size": 10})
    with pytest.raises(ValueError, match="not divisible by down_factor"):
        models.build_model("U-DiT", **{**TINY, "input_size": 12}, down_factor=2)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        models.build_model("U-DiT", **{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="has no argument"):
        models.build_model("U-DiT-S", num_blocks=2)
    no_null = model.clone(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="needs a null class"):
        no_null.apply({"params": random_params(no_null)}, jnp.zeros((2, 8, 8, 3)), t, y, 2.0,
                      method="forward_with_cfg")


def test_pointwise_conv_is_nn_conv_1x1():
    """layers.conv(k=1) is a matmul module with nn.Conv's params: the same names, shapes,
    logical axes and initial values, and the same outputs and gradients."""
    x = jax.random.normal(jax.random.key(7), (2, 5, 3, 6))
    ours = layers.conv(4, 1, ("embed", "mlp"), name=None, dtype=jnp.float32)
    assert isinstance(ours, layers.PointwiseConv)
    reference = nn.Conv(4, (1, 1), param_dtype=jnp.float32, name=None,
                        kernel_init=layers.with_axes(layers.xavier_uniform, ("conv_h", "conv_w", "embed", "mlp")),
                        bias_init=layers.with_axes(layers.zeros, ("mlp",)))
    variables = ours.init(jax.random.key(0), x)
    want = reference.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(want)
    assert variables["params"]["kernel"].names == ("conv_h", "conv_w", "embed", "mlp")
    params = nn.meta.unbox(variables)["params"]
    params = {**params, "bias": jax.random.normal(jax.random.key(1), (4,))}
    np.testing.assert_array_equal(params["kernel"], nn.meta.unbox(want)["params"]["kernel"])
    loss = lambda module: (lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x))))  # noqa: E731
    np.testing.assert_allclose(ours.apply({"params": params}, x), reference.apply({"params": params}, x),
                               rtol=1e-6, atol=1e-6)
    for got, expected in zip(jax.tree_util.tree_leaves(jax.grad(loss(ours))(params)),
                             jax.tree_util.tree_leaves(jax.grad(loss(reference))(params))):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _rep_ffn_reference(p, x):
    """The official training-form FFN written out: four 1x1 convs, exact GELU and the
    identity + dw5 + dw3 + dw1 branches, each a lax convolution. x: [B, H, W, d]."""
    p = nn.meta.unbox(p)
    pointwise = lambda a, q: jnp.einsum("bhwi,io->bhwo", a, q["kernel"][0, 0]) + q["bias"]  # noqa: E731
    a = pointwise(pointwise(x, p["project_in_0"]), p["project_in_1"])
    a = 0.5 * a * (1 + jax.lax.erf(a / np.sqrt(2.0)))
    out = a
    for i in range(3):
        q = p[f"dwconv_{i}"]
        out = out + jax.lax.conv_general_dilated(
            a, q["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=a.shape[-1]) + q["bias"]
    return pointwise(pointwise(out, p["project_out_0"]), p["project_out_1"])


def _rep_ffn_params(d, h, seed=5):
    variables = udit.RepFeedForward(d, h).init(jax.random.key(0), jnp.zeros((1, 4, 4, d)))
    rng = np.random.default_rng(seed)   # init zeroes the biases: random ones instead
    return variables, jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32), nn.meta.unbox(variables)["params"])


def test_rep_ffn_equals_the_official_chain_with_the_same_params():
    """RepFeedForward's params (names, logical axes, initial values) do not depend on the
    tokens it is called with, and it gives the official chain's outputs and gradients."""
    d, h = 8, 16
    x = jax.random.normal(jax.random.key(3), (8, 4, 4, d))
    ffn = udit.RepFeedForward(d, h)
    variables, params = _rep_ffn_params(d, h)
    assert udit.composing_pays(x.size // d, d, h) and not udit.composing_pays(16, d, h)
    big = ffn.init(jax.random.key(0), x)
    leaves = lambda v: jax.tree_util.tree_leaves(v, is_leaf=lambda a: isinstance(a, nn.Partitioned))  # noqa: E731
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(big)
    for a, b in zip(leaves(variables), leaves(big)):
        assert a.names == b.names
        np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_allclose(ffn.apply({"params": params}, x), _rep_ffn_reference(params, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("composed", [False, True])
def test_pointwise_pair_composed_or_not_equals_two_convs(composed):
    """Both forms of a 1x1 pair, values and gradients, against the two convs written out."""
    d, h = 8, 16
    _, params = _rep_ffn_params(d, h)
    first, second = ((params[f"project_in_{i}"]["kernel"], params[f"project_in_{i}"]["bias"])
                     for i in range(2))
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, d))
    conv = lambda a, k, b: jnp.einsum("bhwi,io->bhwo", a, k[0, 0]) + b   # noqa: E731
    reference = lambda x, f, s: jnp.sum(jnp.sin(conv(conv(x, *f), *s)))  # noqa: E731
    ours = lambda x, f, s: jnp.sum(jnp.sin(udit.pointwise_pair(x, f, s, jnp.float32, composed)))  # noqa: E731
    np.testing.assert_allclose(ours(x, first, second), reference(x, first, second), rtol=1e-5)
    got = jax.grad(ours, argnums=(0, 1, 2))(x, first, second)
    want = jax.grad(reference, argnums=(0, 1, 2))(x, first, second)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert_close_rel(a, b, 1e-5)


def test_rep_ffn_composes_off_cpus_only():
    """Lowered for a TPU (as --mode=compile lowers it) the pairs compose where the tokens pay:
    a kernel product and a bias product per pair, 6 dots instead of 4; on CPUs never."""
    ffn = udit.RepFeedForward(8, 16)
    params = nn.meta.unbox(jax.eval_shape(ffn.init, jax.random.key(0), jnp.zeros((1, 4, 4, 8))))

    def dots(batch, platform):
        x = jax.ShapeDtypeStruct((batch, 4, 4, 8), jnp.float32)
        text = jax.jit(ffn.apply).trace(params, x).lower(lowering_platforms=(platform,)).as_text()
        return text.count("stablehlo.dot_general")

    assert dots(8, "tpu") == 6 and dots(1, "tpu") == 4
    assert dots(8, "cpu") == 4


def test_rep_ffn_composes_by_tokens_per_device(monkeypatch):
    """The batch split over the mesh's data axes counts: 8 images over 8 devices are one
    image's 16 tokens per device."""
    from jax.sharding import AbstractMesh, AxisType
    asked = []
    decide = udit.composing_pays
    monkeypatch.setattr(udit, "composing_pays", lambda t, d, h: asked.append(t) or decide(t, d, h))
    ffn, x = udit.RepFeedForward(8, 16), jnp.zeros((8, 4, 4, 8))
    params = nn.meta.unbox(jax.eval_shape(ffn.init, jax.random.key(0), x))
    apply = lambda: jax.eval_shape(ffn.apply, params, x)  # noqa: E731
    assert layers.batch_shards() == 1
    apply()
    mesh = AbstractMesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    with jax.sharding.use_abstract_mesh(mesh):
        for axes, shards in (("data", 4), (("data", "fsdp"), 8)):
            with nn.logical_axis_rules((("activation_batch", axes),)):
                assert layers.batch_shards() == shards
                apply()
    assert asked == [128, 128, 32, 16]   # init, then the three applies
