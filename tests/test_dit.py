"""DiT against the official PyTorch model: fixtures, the paper's tables, init rules, errors."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, assert_close_rel, load_npz
from udit_jax.convert import dit as convert_dit
from udit_jax.convert.common import ConversionError, check_state_dict
from udit_jax import models
from udit_jax.models import dit, layers, registry
from udit_jax.models.dit import (BLOCK_TYPES, AdaLNBlock, Attention, DiT, FinalLayer, Mlp,
                                 sincos_pos_embed_2d)
from udit_jax.models.info import abstract_params, count_params

# DiT paper Table 4 "Gflops" (forward MACs, 256x256 images = 32x32 latents), and XL/2 at 512.
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
PAPER_GFLOPS_XL2_512 = 524.6
# DiT paper Fig. 5 legend: DiT-XL/2 with each conditioning design (one decimal).
PAPER_FIG5_GFLOPS = {"adaln_zero": 118.6, "adaln": 118.6, "in_context": 119.4, "cross_attn": 137.6}


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def reduced(fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    model = DiT(**manifest["dit_reduced"]["config"])
    model.validate()
    state_dict = load_npz("dit_reduced_state_dict.npz")
    params = convert_dit.params_from_torch(model, state_dict)
    return model, state_dict, params


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return load_npz("dit_reduced_io.npz")


@pytest.fixture(scope="module")
def full_configs(fixtures_dir):
    return json.loads((fixtures_dir / "dit_full_configs.json").read_text())


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def flax_path(torch_module: str) -> tuple[str, ...]:
    """'blocks.0.attn' -> ('blocks_0', 'attn')."""
    out = []
    for part in torch_module.split("."):
        if part.isdigit():
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def same_config(a: DiT, b: DiT) -> bool:
    fields = [f.name for f in dataclasses.fields(DiT) if f.name not in ("parent", "name")]
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def tiny(**overrides) -> DiT:
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
               num_classes=10)
    cfg.update(overrides)
    model = DiT(**cfg)
    model.validate()
    return model


def init(model, seed=0):
    """Fresh unboxed params, initialised under jit (eager init is slow on CPU)."""
    variables = jax.jit(model.init)(jax.random.key(seed), *model.example_inputs(1))
    return nn.unbox(variables["params"])


def random_inputs(model, batch, seed=0):
    kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
    s = model.input_size
    x = jax.random.normal(kx, (batch, s, s, model.in_channels))
    t = jax.random.randint(kt, (batch,), 0, 1000)
    y = jax.random.randint(ky, (batch,), 0, model.num_classes)
    return x, t, y


def perturbed(params, seed=1, std=0.02):
    """params + N(0, std^2) noise on every entry (numpy arrays), so no layer stays zero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: (np.asarray(p) + std * rng.standard_normal(p.shape)).astype(np.float32), params)


# ------------------------------------------------------------------- parity with fixtures
def test_forward_matches_official(reduced, io):
    model, _, params = reduced
    out = jax.jit(model.apply)({"params": params}, nhwc(io["x"]), io["t"], io["y"])
    assert out.dtype == jnp.float32
    assert_close_rel(nchw(out), io["out"], 1e-5, "DiT forward")


def test_forward_with_cfg_matches_official(reduced, io):
    model, _, params = reduced
    args = (nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"])
    raw = model.apply({"params": params}, *args)
    assert_close_rel(nchw(raw), io["out_cfg_raw"], 1e-5, "DiT forward on the CFG batch")
    out = model.apply({"params": params}, *args, io["cfg_scale"], method="forward_with_cfg")
    assert_close_rel(nchw(out), io["out_cfg"], 1e-5, "forward_with_cfg (3 guided channels)")


def test_forward_with_cfg_all_channels(reduced, io):
    """cfg_channels=None guides every channel: closed form on the official raw output."""
    model, _, params = reduced
    model = model.clone(cfg_channels=None)
    out = model.apply({"params": params}, nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"],
                      io["cfg_scale"], method="forward_with_cfg")
    raw = io["out_cfg_raw"].astype(np.float64)
    cond, uncond = np.split(raw, 2, axis=0)
    guided = uncond + float(io["cfg_scale"]) * (cond - uncond)
    assert_close_rel(nchw(out), np.concatenate([guided, guided]), 1e-5, "CFG on all channels")


def test_activations_in_forward_match_official(reduced, io):
    """Every submodule output captured in the official forward, seen in ours."""
    model, _, params = reduced
    acts = load_npz("dit_reduced_activations.npz")
    _, state = model.apply({"params": params}, nhwc(io["x"]), io["t"], io["y"],
                           capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    outs = [k for k in acts if k.endswith("@out")]
    assert any(k.startswith("blocks.") for k in outs) and "final_layer@out" in outs
    for key in outs:
        node = inter
        for part in flax_path(key[: -len("@out")]):
            node = node[part]
        assert_close_rel(node["__call__"][0], acts[key], 1e-5, key)


def test_submodules_in_isolation_match_official(reduced):
    """Each block, attention, MLP and the final layer fed the official inputs."""
    model, _, params = reduced
    acts = load_npz("dit_reduced_activations.npz")
    d, heads = model.hidden_size, model.num_heads
    blocks = sorted({int(m.group(1)) for k in acts if (m := re.match(r"blocks\.(\d+)@in0", k))})
    assert len(blocks) == model.depth
    for i in blocks:
        p = params[f"blocks_{i}"]
        out = AdaLNBlock(d, heads, model.mlp_ratio).apply(
            {"params": p}, acts[f"blocks.{i}@in0"], acts[f"blocks.{i}@in1"])
        assert_close_rel(out, acts[f"blocks.{i}@out"], 1e-5, f"blocks.{i}")
        out = Attention(d, heads).apply({"params": p["attn"]}, acts[f"blocks.{i}.attn@in0"])
        assert_close_rel(out, acts[f"blocks.{i}.attn@out"], 1e-5, f"blocks.{i}.attn")
        out = Mlp(d, int(d * model.mlp_ratio)).apply({"params": p["mlp"]}, acts[f"blocks.{i}.mlp@in0"])
        assert_close_rel(out, acts[f"blocks.{i}.mlp@out"], 1e-5, f"blocks.{i}.mlp")
    out = FinalLayer(d, model.patch_size, model.out_channels).apply(
        {"params": params["final_layer"]}, acts["final_layer@in0"], acts["final_layer@in1"])
    assert_close_rel(out, acts["final_layer@out"], 1e-5, "final_layer")


def test_pos_embed_equals_official_table(reduced):
    model, state_dict, _ = reduced
    table = sincos_pos_embed_2d(model.hidden_size, model.grid_size)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table[None], state_dict["pos_embed"])


def test_pos_embed_layout_closed_form():
    """Channel 0 is sin(column), channel D/4 cos(column), channel D/2 sin(row)."""
    d, g = 16, 5
    table = sincos_pos_embed_2d(d, g)
    rows, cols = np.divmod(np.arange(g * g), g)
    np.testing.assert_allclose(table[:, 0], np.sin(cols), atol=1e-7)
    np.testing.assert_allclose(table[:, d // 4], np.cos(cols), atol=1e-7)
    np.testing.assert_allclose(table[:, d // 2], np.sin(rows), atol=1e-7)
    np.testing.assert_allclose(table[:, d // 2 + 1], np.sin(rows * 10000.0 ** (-1 / 4)), atol=1e-7)


# --------------------------------------------------------------------------- conversion
def test_state_dict_round_trip_is_bit_exact(reduced):
    model, state_dict, params = reduced
    back = convert_dit.params_to_torch(model, params)
    assert sorted(back) == sorted(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_every_official_key_of_every_config_converts(full_configs):
    """Keys and shapes of all DiT configs match ours, without allocating any weights."""
    assert len(full_configs) == 13
    for name, entry in full_configs.items():
        model = DiT(input_size=entry["input_size"], **entry["config"])
        specs = convert_dit.torch_key_specs(model)
        expected = {k: tuple(v) for k, v in entry["state_dict_shapes"].items()}
        ours = {s.torch_key: s.torch_shape for s in specs}
        ours[convert_dit.POS_EMBED_KEY] = (1, model.num_patches, model.hidden_size)
        assert ours == expected, name
        views = {k: np.broadcast_to(np.float32(0), v) for k, v in expected.items()}
        check_state_dict(specs + [convert_dit.pos_embed_spec(model)], views, name)
        # The official name builds the same architecture.
        base = name.split("@")[0]
        named = registry.build_model(base, input_size=entry["input_size"],
                                     num_classes=entry["config"]["num_classes"])
        assert same_config(named, model), name


def test_param_counts_match_official(full_configs):
    for name, entry in full_configs.items():
        model = DiT(input_size=entry["input_size"], **entry["config"])
        count = count_params(model)   # traces the full model: once per config
        assert count == entry["param_count"], name
        assert count - model.fixed_param_count() == entry["param_count_trainable"], name


def test_every_param_has_logical_axes(reduced):
    model, _, _ = reduced
    for block_type in BLOCK_TYPES:
        boxed = abstract_params(model.clone(block_type=block_type))
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), block_type
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim


# -------------------------------------------------------------------------------- MACs
def test_count_macs_reproduces_paper_table_4():
    for name, gflops in PAPER_GFLOPS.items():
        got = registry.build_model(name).count_macs() / 1e9
        assert abs(got - gflops) <= 0.01, f"{name}: {got:.4f} vs paper {gflops}"
    got = registry.build_model("DiT-XL/2", input_size=64).count_macs() / 1e9
    assert abs(got - PAPER_GFLOPS_XL2_512) <= 0.01, got


def test_count_macs_of_conditioning_variants_match_paper_fig5():
    for block_type, gflops in PAPER_FIG5_GFLOPS.items():
        got = registry.build_model("DiT-XL/2", block_type=block_type).count_macs() / 1e9
        assert abs(got - gflops) <= 0.05, f"{block_type}: {got:.3f} vs paper {gflops}"


def test_count_macs_closed_form_for_a_tiny_model():
    """One block of one head on 4 tokens, worked out by hand."""
    m = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=4, depth=1, num_heads=1,
            mlp_ratio=1.0, learn_sigma=False, num_classes=3)
    t, d, p = 4, 4, 2
    expected = (t * d * 1 * p * p          # patch conv
                + 256 + 256 * d + d * d    # sinusoid multiplies, timestep MLP
                + d * 6 * d + 2 * t * d    # adaLN Linear, two modulations
                + 4 * t * d * d + 2 * t * t * d  # qkv + proj, two attention matmuls
                + 2 * t * d * d            # MLP
                + d * 2 * d + t * d        # final adaLN, modulation
                + t * d * p * p * 1        # final Linear
                + t * p * p * 1)           # unpatchify
    assert m.count_macs() == expected


# ---------------------------------------------------------------------------- init rules
def test_init_follows_official_rules():
    model = tiny(hidden_size=128, depth=1, num_heads=4, input_size=8, num_classes=100)
    params = init(model)
    c, p, d = model.in_channels, model.patch_size, model.hidden_size

    def check_xavier(w, fan_in, fan_out, what):
        w = np.asarray(w)
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= bound, what
        assert np.abs(w).max() > 0.95 * bound, what
        assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.1, what

    blk = params["blocks_0"]
    check_xavier(blk["attn"]["qkv"]["kernel"], d, 3 * d, "qkv")
    check_xavier(blk["attn"]["proj"]["kernel"], d, d, "proj")
    check_xavier(blk["mlp"]["fc1"]["kernel"], d, 4 * d, "fc1")
    # The patch conv: xavier on the (D, C*p*p) view, not with a conv's fans.
    check_xavier(params["x_embedder"]["proj"]["kernel"], c * p * p, d, "x_embedder")
    for w in (params["y_embedder"]["embedding_table"], params["t_embedder"]["mlp_0"]["kernel"],
              params["t_embedder"]["mlp_2"]["kernel"]):
        assert abs(np.asarray(w).std() / 0.02 - 1) < 0.1
    for w in (blk["adaLN_modulation"], params["final_layer"]["adaLN_modulation"],
              params["final_layer"]["linear"]):
        assert not np.any(np.asarray(w["kernel"])) and not np.any(np.asarray(w["bias"]))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        assert leaf.dtype == jnp.float32
        if path[-1].key == "bias":
            assert not np.any(np.asarray(leaf)), path


# --------------------------------------------------------------------- variants, options
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_block_types_zero_at_init_trainable_and_convertible(block_type):
    model = tiny(block_type=block_type, depth=1)
    params = init(model)
    x, t, y = random_inputs(model, 2)
    apply = jax.jit(model.apply)
    out = apply({"params": params}, x, t, y)
    assert out.shape == (2, model.input_size, model.input_size, model.out_channels)
    assert not np.any(np.asarray(out)), "the zero-initialised final layer gives a zero output"

    trained_like = perturbed(params, std=0.2)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply({"params": p}, x, t, y) ** 2)))(trained_like)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), (block_type, path)
    # The label reaches the output (through adaLN, the extra tokens or cross-attention).
    other_y = (y + 1) % model.num_classes
    diff = apply({"params": trained_like}, x, t, other_y) - apply({"params": trained_like}, x, t, y)
    assert np.abs(np.asarray(diff)).max() > 1e-4

    sd = convert_dit.params_to_torch(model, trained_like)
    assert len(sd) == len(jax.tree_util.tree_leaves(params)) + 1
    back = convert_dit.params_from_torch(model, sd)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, trained_like)


def test_remat_and_bfloat16(reduced, io):
    model, _, params = reduced
    args = (nhwc(io["x"]), io["t"], io["y"])
    remat = model.clone(remat=True)
    remat_out = jax.jit(remat.apply)({"params": params}, *args)
    np.testing.assert_allclose(remat_out, jax.jit(model.apply)({"params": params}, *args), atol=1e-6)
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, *args) ** 2)
    g_remat = jax.jit(jax.grad(loss(remat)))(params)
    g_plain = jax.jit(jax.grad(loss(model)))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           g_remat, g_plain)
    bf16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *args)
    assert bf16.dtype == jnp.float32
    assert_close_rel(nchw(bf16), io["out"], 3e-2, "bfloat16 forward")


def test_qkv_projection_forms_agree_with_the_fused_linear():
    """Each platform's and chip's q/k/v form (one matmul; three on TPUs; tokens-minor on v5p,
    see layers.qkv_projection) gives x @ kernel + bias split into q, k, v and heads: the same
    values and gradients (float32). The v5p form's matmuls write [B, D, N] (tokens minor)."""
    kx, kw, kb, kg = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (2, 16, 24))
    kernel, bias = jax.random.normal(kw, (24, 3 * 32)), jax.random.normal(kb, (3 * 32,))
    heads = 4
    want = [a.reshape(2, 16, heads, 8) for a in np.split(np.asarray(x @ kernel + bias), 3, -1)]
    g = [jax.random.normal(k, (2, 16, heads, 8)) for k in jax.random.split(kg, 3)]

    def loss(x, kernel, bias):
        return sum(jnp.sum(o * gi) for o, gi in zip(layers.qkv_projection(x, kernel, bias, heads), g))

    def grads_x_kernel_bias():
        # dq = g: dx = sum_s g_s @ kernel_s.T, dkernel_s = x.T @ g_s, dbias_s = sum g_s.
        gs = [np.asarray(a).reshape(2, 16, 32) for a in g]
        ks = np.split(np.asarray(kernel), 3, axis=1)
        return (sum(gi @ k.T for gi, k in zip(gs, ks)),
                np.concatenate([np.einsum("bnc,bne->ce", x, gi) for gi in gs], axis=1),
                np.concatenate([gi.sum((0, 1)) for gi in gs]))
    want_grads = grads_x_kernel_bias()
    forms = (("cpu", None), ("tpu", None), ("tpu", "TPU v5"), ("tpu", "TPU v5 lite"))
    for form in forms:
        with models.forms_for(*form):
            for a, b in zip(layers.qkv_projection(x, kernel, bias, heads), want):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=str(form))
            for a, b in zip(jax.grad(loss, (0, 1, 2))(x, kernel, bias), want_grads):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=str(form))
            jaxpr = str(jax.make_jaxpr(lambda *a: layers.qkv_projection(*a, heads))(x, kernel, bias))
        tokens_minor = re.search(r"f32\[[\d,]+,16\] = dot_general", jaxpr) is not None
        assert tokens_minor == (form == ("tpu", "TPU v5")), form


def test_label_dropout_rate():
    p = 0.25
    model = tiny(input_size=2, patch_size=1, hidden_size=8, depth=1, num_heads=1,
                 class_dropout_prob=p)
    params = init(model)
    n = 4000
    x = jnp.zeros((n, 2, 2, 4))
    t = jnp.zeros((n,), jnp.int32)
    y = jnp.arange(n) % model.num_classes
    table = np.asarray(params["y_embedder"]["embedding_table"])

    @jax.jit
    def label_embeddings(key):
        _, state = model.apply({"params": params}, x, t, y, train=key is not None,
                               rngs=None if key is None else {"label_dropout": key},
                               capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]["y_embedder"]["__call__"][0]

    def label_rows(key):
        emb = np.asarray(label_embeddings(key))
        return (emb == table[model.num_classes]).all(axis=1), (emb == table[np.asarray(y)]).all(axis=1)

    dropped, kept = label_rows(jax.random.key(3))
    assert np.all(dropped ^ kept)
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    dropped, kept = label_rows(None)
    assert not dropped.any() and kept.all()


# ------------------------------------------------------------------------------ errors
def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'DiT-XXL/2'"):
        registry.build_model("DiT-XXL/2")


@pytest.mark.parametrize("overrides, match", [
    (dict(input_size=9), "input_size=9 is not divisible by patch_size=2"),
    (dict(num_heads=3), "hidden_size=32 is not divisible by num_heads=3"),
    (dict(hidden_size=30, num_heads=3), "divisible by 4"),
    (dict(block_type="film"), "unknown block_type 'film'"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(class_dropout_prob=1.5), "class_dropout_prob"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(cfg_channels=0), "cfg_channels"),
])
def test_bad_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)
    with pytest.raises(ValueError, match=match):
        registry.build_model("DiT", **{**dict(input_size=8, hidden_size=32, depth=2, num_heads=4),
                                       **overrides})


def test_wrong_input_shapes_are_refused(reduced, io):
    model, _, params = reduced
    s, c = model.input_size, model.in_channels
    t, y = io["t"], io["y"]
    apply = lambda x, t=t, y=y: model.apply({"params": params}, x, t, y)
    with pytest.raises(ValueError, match=f"input_size={s}"):
        apply(np.zeros((2, 2 * s, 2 * s, c), np.float32))
    with pytest.raises(ValueError, match=f"{c} input channels"):
        apply(np.zeros((2, s, s, c + 1), np.float32))
    with pytest.raises(ValueError, match="NCHW"):
        apply(io["x"])
    with pytest.raises(ValueError, match="t of shape"):
        apply(nhwc(io["x"]), t=t[:1])
    with pytest.raises(ValueError, match="even batch"):
        model.apply({"params": params}, nhwc(io["x"])[:1], t[:1], y[:1], 4.0, method="forward_with_cfg")


def test_wrong_state_dicts_are_refused(reduced):
    model, state_dict, _ = reduced
    broken = dict(state_dict)
    del broken["blocks.0.attn.qkv.bias"]
    broken["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    broken["final_layer.linear.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_dit.params_from_torch(model, broken)
    msg = str(err.value)
    for key in ("blocks.0.attn.qkv.bias", "blocks.0.attn.extra", "final_layer.linear.weight"):
        assert key in msg

    # Weights of another model: every mismatch listed.
    other = model.clone(depth=model.depth + 1, hidden_size=2 * model.hidden_size)
    with pytest.raises(ConversionError, match=f"blocks.{model.depth}.attn.qkv.weight"):
        convert_dit.params_from_torch(other, state_dict)

    shifted = dict(state_dict, pos_embed=state_dict["pos_embed"] + 1e-3)
    with pytest.raises(ConversionError, match="input_size"):
        convert_dit.params_from_torch(model, shifted)


def test_direct_construction_is_validated_at_call():
    model = DiT(input_size=8, patch_size=3, hidden_size=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="not divisible by patch_size=3"):
        model.init(jax.random.key(0), *model.example_inputs(1))
