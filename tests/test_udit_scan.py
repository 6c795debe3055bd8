"""U-DiT with scan_blocks=True (each stage's blocks scanned over stacked params) is the same
model as the unrolled one: outputs, gradients, official state_dict, counts; and a training
run may switch between the two layouts on resume."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_params
from udit_jax import convert
from udit_jax.models import build_model, info
from udit_jax.models.udit import fuse_ffn_params, relayout_blocks, stack_blocks, unstack_blocks

DEPTH = (0, 2, 1, 0, 1)
KWARGS = dict(input_size=8, in_channels=4, hidden_size=8, depth=DEPTH, num_heads=2,
              mlp_ratio=2, num_classes=10, ffn_type="rep", rep=1, attn_type="v2",
              posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)


@pytest.fixture(scope="module")
def models_and_params():
    unrolled = build_model("U-DiT", **KWARGS)
    scanned = build_model("U-DiT", **KWARGS, scan_blocks=True)
    # Non-zero adaLN/final weights, so every block changes the output.
    params = random_params(unrolled)
    return unrolled, scanned, params


def apply(model, params, x, t, y):
    """model.apply as one compiled program (op by op, a U-DiT takes minutes on a CPU)."""
    return jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params)


def grads(model, params, x, t, y):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, y) ** 2)))(params)


def inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32),
            jnp.asarray([3, 700]) % 1000, jnp.asarray([1, 7]))


def test_scanned_param_tree_is_the_stacked_unrolled_tree(models_and_params):
    unrolled, scanned, params = models_and_params
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    got = info.abstract_params(scanned)
    assert shapes(nn.unbox(got)) == shapes(stack_blocks(params, DEPTH))
    assert set(got) >= {"encoder_level_2", "latent"} and "latent_0" not in got
    assert info.model_info(scanned) == info.model_info(unrolled)
    # The stacked axis is replicated (no logical name); the others keep theirs.
    spec = info.logical_axes(scanned)["latent"]["attn1"]["to_qkv"]["kernel"]
    assert tuple(spec) == (None, "embed", "mlp")


def test_same_outputs_float32(models_and_params):
    unrolled, scanned, params = models_and_params
    x, t, y = inputs()
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(apply(scanned, stack_blocks(params, DEPTH), x, t, y),
                                   apply(unrolled, params, x, t, y), rtol=0, atol=1e-6)


@pytest.mark.slow   # two U-DiT gradients: a minute of XLA compile on a 2-core CI machine
def test_same_gradients_float32(models_and_params):
    unrolled, scanned, params = models_and_params
    stacked = stack_blocks(params, DEPTH)
    x, t, y = inputs()
    with jax.default_matmul_precision("highest"):
        g_u = grads(unrolled, params, x, t, y)
        g_s = unstack_blocks(grads(scanned, stacked, x, t, y), DEPTH)
    assert jax.tree.structure(g_s) == jax.tree.structure(g_u)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_u))
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, scale))


def test_remat_scanned_model_matches(models_and_params):
    unrolled, _, params = models_and_params
    remat = build_model("U-DiT", **KWARGS, scan_blocks=True, remat=True)
    x, t, y = inputs()
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(apply(remat, stack_blocks(params, DEPTH), x, t, y),
                                   apply(unrolled, params, x, t, y), rtol=0, atol=1e-6)


def test_same_official_state_dict_both_ways(models_and_params):
    unrolled, scanned, params = models_and_params
    stacked = stack_blocks(jax.tree.map(np.asarray, params), DEPTH)
    sd_u = convert.params_to_torch(unrolled, params)
    sd_s = convert.params_to_torch(scanned, stacked)
    assert sd_s.keys() == sd_u.keys() and "encoder_level_2.1.attn1.to_qkv.weight" in sd_s
    for k in sd_u:
        np.testing.assert_array_equal(sd_s[k], sd_u[k], err_msg=k)
    back = convert.params_from_torch(scanned, sd_u)
    assert jax.tree.structure(back) == jax.tree.structure(stacked)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)


def test_fused_ffn_of_stacked_params(models_and_params):
    unrolled, scanned, params = models_and_params
    fused_s = jax.jit(fuse_ffn_params)(stack_blocks(params, DEPTH))
    fused_u = stack_blocks(jax.jit(fuse_ffn_params)(params), DEPTH)
    for a, b in zip(jax.tree.leaves(fused_s), jax.tree.leaves(fused_u)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    x, t, y = inputs()
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(apply(scanned.inference_form(), fused_s, x, t, y),
                                   apply(unrolled, params, x, t, y), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Switching layouts on resume: the same state, re-laid (checkpoints.Relayout).

def test_relayout_converts_every_params_tree_of_a_train_state(models_and_params):
    _, _, params = models_and_params
    tx = optax.adamw(1e-3)
    opt = jax.tree.map(lambda x: x + 1.0, tx.init(params))   # moments unlike the params
    state = {"params": params, "ema": jax.tree.map(lambda x: 2 * x, params), "opt": opt,
             "step": jnp.int32(3)}
    stacked = relayout_blocks(state, DEPTH, scanned=True)
    assert jax.tree.structure(stacked["opt"]) == jax.tree.structure(tx.init(stack_blocks(params, DEPTH)))
    for got, want in ((stacked["params"], stack_blocks(params, DEPTH)),
                      (stacked["ema"], stack_blocks(state["ema"], DEPTH)),
                      (stacked["opt"][0].mu, stack_blocks(opt[0].mu, DEPTH)),
                      (stacked["opt"][0].nu, stack_blocks(opt[0].nu, DEPTH))):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert int(stacked["step"]) == 3 and int(stacked["opt"][0].count) == int(opt[0].count)
    # Back to unrolled: exactly the state; a tree already in the wanted layout is kept.
    back = relayout_blocks(stacked, DEPTH, scanned=False)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    again = relayout_blocks(stacked, DEPTH, scanned=True)
    assert jax.tree.structure(again) == jax.tree.structure(stacked)


# A tiny pixel-space U-DiT trained on synthetic data; checkpoints at steps 2 and 4.
# The model is the file's (KWARGS) at hidden size 16; the data sets its input size and classes.
RUN = {"model.name": "U-DiT",
       "model.kwargs": {**{k: v for k, v in KWARGS.items()
                           if k not in ("input_size", "in_channels", "num_classes")},
                        "hidden_size": 16, "down_factor": 2},
       "data.source": "synthetic", "data.space": "pixel", "data.image_size": 8,
       "data.channels": 1, "data.num_classes": 3, "batch_size": 4, "total_steps": 4,
       "log_every_steps": 2, "checkpoint_every_steps": 2, "sample_every_steps": 0,
       "optimizer.learning_rate": 3e-3, "optimizer.ema_decay": 0.9,
       "checkpoint.keep": 5, "checkpoint.keep_every": 0}


def run_config(scan_blocks: bool):
    from udit_jax import config as config_lib
    config = config_lib.base_config()
    config.update_from_flattened_dict({**RUN, "model.scan_blocks": scan_blocks})
    return config


def test_a_scanned_run_resumes_unrolled_where_it_stopped(tmp_path, caplog):
    """4 steps scanned, against 2 scanned + a restart unrolled + 2: the restart converts the
    checkpoint (params, EMA, Adam moments) instead of refusing it or starting over, and
    training goes on from it to the same state (to float32 rounding: two programs)."""
    from udit_jax import train
    depth = RUN["model.kwargs"]["depth"]
    straight = train.train_and_evaluate(run_config(True), str(tmp_path / "straight"))
    (tmp_path / "switched" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "2",
                    tmp_path / "switched" / "checkpoints" / "2")
    with caplog.at_level("INFO"):
        switched = train.train_and_evaluate(run_config(False), str(tmp_path / "switched"))
    assert "holds model.scan_blocks=True: converting it" in caplog.text
    assert int(switched.step) == 4
    expected = relayout_blocks(jax.device_get(straight), depth, scanned=False)
    got = jax.tree_util.tree_leaves_with_path(jax.device_get(switched))
    want = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The step-2 checkpoint it resumed from is where it was, unchanged in layout.
    assert (tmp_path / "switched" / "checkpoints" / "2").is_dir()
    # The unrolled run's own checkpoint reads back scanned (the other direction).
    _, ema, step = train.restore_ema_params(run_config(True), str(tmp_path / "switched"))
    assert step == 4
    for a, b in zip(jax.tree.leaves(jax.device_get(ema)),
                    jax.tree.leaves(stack_blocks(jax.device_get(switched.ema_params), depth))):
        np.testing.assert_array_equal(a, b)
    # Fine-tuning (on_mismatch='load_params', another seed) from the scanned run, unrolled:
    # its params and EMA, re-laid, with a fresh optimizer at step 0.
    from udit_jax import checkpoints
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "tune" / "checkpoints")
    config = run_config(False)
    config.seed, config.checkpoint.on_mismatch = 1, "load_params"
    trainer = train.make_trainer(config)
    ckpt = checkpoints.Checkpointer(tmp_path / "tune", config=config, on_mismatch="load_params")
    try:
        step, tuned = ckpt.restore(trainer.restore_target(), init=trainer.init_state,
                                   relayouts=trainer.relayouts())
    finally:
        ckpt.close()
    assert step == 0 and int(tuned.opt_state[0].count) == 0
    for name in ("params", "ema_params"):
        got, want = jax.device_get(getattr(tuned, name)), getattr(expected, name)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
