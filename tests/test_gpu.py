"""On a GPU: the fused cuDNN attention, bfloat16 training and the GPU lowering of the models
agree with XLA's float32 attention, float32 training and the CPU.

Skipped where JAX sees no GPU (CI has none). On a GPU host:

    JAX_PLATFORMS=cuda,cpu python -m pytest tests/test_gpu.py -n 0

Errors are ||out - ref|| / ||ref|| against float32 references computed on the CPU at full
precision (conftest). bfloat16 operands (8 significant bits) land near 2**-9 = 2e-3 per
product, a few 1e-3 after softmax and sums; float32 on the GPU near 1e-6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from udit_jax import models, train
from udit_jax.models import layers

from conftest import random_params
from test_train import make_config


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


GPU = _gpu()
CPU = jax.devices("cpu")[0]
pytestmark = pytest.mark.skipif(GPU is None, reason="needs a GPU (JAX_PLATFORMS=cuda,cpu on a GPU host)")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def on(device, tree):
    return jax.device_put(tree, device)


# Attention shapes [B, N, heads, hd] where the models meet them at 256x256: DiT-XL/2 (256
# tokens, 16 heads of 72); U-DiT-L's stages 1-3 after the 2x2 token downsampling (4 groups per
# image of 256, 64 and 16 tokens; heads of 24, 48, 96).
ATTENTION_SHAPES = {"DiT-XL/2": (4, 256, 16, 72), "U-DiT-L stage 1": (16, 256, 16, 24),
                    "U-DiT-L stage 2": (16, 64, 16, 48), "U-DiT-L stage 3": (16, 16, 16, 96)}


@pytest.mark.parametrize("implementation", ["cudnn", None])
@pytest.mark.parametrize("shape", sorted(ATTENTION_SHAPES))
def test_bfloat16_attention_and_its_gradients_match_float32(shape, implementation):
    """The fused cuDNN kernel and XLA's float32-softmax attention, on bfloat16 q, k, v, against
    float32 attention on the CPU: outputs and the three input gradients."""
    q, k, v, g = (jax.random.normal(key, ATTENTION_SHAPES[shape])
                  for key in jax.random.split(jax.random.key(len(shape)), 4))
    scale = ATTENTION_SHAPES[shape][-1] ** -0.5

    def attend(impl):
        def loss(q, k, v, g):
            out = layers.attention(q, k, v, scale=scale, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * g), out
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    bf16 = lambda a: a.astype(jnp.bfloat16)
    grads, out = attend(implementation)(*on(GPU, (bf16(q), bf16(k), bf16(v))), on(GPU, g))
    ref_grads, ref = attend(None)(*on(CPU, (q, k, v, g)))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2, shape
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < 2e-2, (shape, name)


UDIT = dict(input_size=16, in_channels=4, hidden_size=64, depth=(1, 1, 1, 1, 1), num_heads=2,
            num_classes=10, attn_type="v2", posemb_type="rope2d", downsampler="dwconv5",
            down_shortcut=1)
DIT = dict(input_size=16, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=2,
           num_classes=10)
FAMILIES = {"U-DiT": UDIT, "DiT": DIT}
UDIT_KWARGS = {k: v for k, v in UDIT.items() if k not in ("input_size", "in_channels", "num_classes")}


def _inputs(batch: int = 8):
    kx, kt, ky = jax.random.split(jax.random.key(3), 3)
    return (jax.random.normal(kx, (batch, 16, 16, 4)), jax.random.randint(kt, (batch,), 0, 1000),
            jax.random.randint(ky, (batch,), 0, 10))


def _output_and_grads(model, params, x, t, y):
    """(model output, gradients of a fixed projection of it with respect to the params)."""
    shape = jax.eval_shape(lambda: model.apply({"params": params}, x, t, y)).shape
    w = jax.random.normal(jax.random.key(4), shape)

    def loss(p):
        out = model.apply({"params": p}, x, t, y).astype(jnp.float32)
        return jnp.sum(out * w), out
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
    return out, grads


@functools.cache
def _cpu_reference(family: str):
    """(params, (x, t, y), float32 output and param gradients on the CPU) of a small model."""
    model = models.build_model(family, **FAMILIES[family])
    params = random_params(model)   # the official init zeroes the output layer
    inputs = _inputs()
    return params, inputs, _output_and_grads(model, on(CPU, params), *on(CPU, inputs))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_model_on_the_gpu_matches_the_cpu(family):
    """The GPU lowering (U-DiT's rep FFN composes its 1x1 pairs off CPUs, its depthwise convs
    are cuDNN's grouped convolutions) computes what the CPU's does, outputs and every parameter
    gradient, at float32."""
    params, inputs, (ref, ref_grads) = _cpu_reference(family)
    model = models.build_model(family, **FAMILIES[family])
    out, grads = _output_and_grads(model, on(GPU, params), *on(GPU, inputs))
    assert rel_err(out, ref) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert rel_err(a, b) < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bfloat16_model_with_cudnn_attention_matches_float32(family):
    """bfloat16 compute with the cuDNN attention, against the float32 model on the CPU, no
    further off than bfloat16 with XLA's attention."""
    params, inputs, (ref, _) = _cpu_reference(family)
    errors = {}
    for impl in ("cudnn", None):
        model = models.build_model(family, **FAMILIES[family], dtype=jnp.bfloat16, attention_impl=impl)
        out, _ = _output_and_grads(model, on(GPU, params), *on(GPU, inputs))
        errors[impl] = rel_err(out, ref)
    assert errors["cudnn"] < 2e-2, errors
    assert errors["cudnn"] < 2 * errors[None] + 1e-3, errors


def test_bfloat16_training_tracks_float32():
    """The real train step (train.make_trainer) in bfloat16 and float32 from the same init on the
    same synthetic batches: the two loss curves stay within a few percent and both fall."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = make_config({"model.name": "U-DiT", "model.kwargs": UDIT_KWARGS,
                              "data.image_size": 16, "data.channels": 4, "batch_size": 16,
                              "model.dtype": dtype})
        trainer = train.make_trainer(config)
        state = trainer.init_state()
        step = trainer.jit_step(next(train.SyntheticBatches(config, 0, 1)))
        batches = train.SyntheticBatches(config, 0, 1)
        curve = []
        for _ in range(40):
            state, metrics = step(state, trainer.global_batch(next(batches)))
            curve.append(float(metrics["loss"]))
        losses[dtype] = np.array(curve)
    f32, bf16 = losses["float32"], losses["bfloat16"]
    assert np.all(np.isfinite(bf16))
    assert f32[-10:].mean() < 0.8 * f32[:5].mean(), f32
    # Early steps from the same params: nearly the same loss; later the paths may part a little.
    assert np.max(np.abs(bf16[:5] - f32[:5]) / f32[:5]) < 0.02, (f32[:5], bf16[:5])
    assert abs(bf16[-10:].mean() / f32[-10:].mean() - 1) < 0.1, (f32[-10:], bf16[-10:])
