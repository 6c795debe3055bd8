"""InceptionV3 in the FID configuration: the TF 2015-12-05 graph as ported by pytorch-fid.

This is the network behind every published FID/sFID/IS number (ADM's evaluator, pytorch-fid,
DiT, U-DiT). It differs from a stock InceptionV3 in ways that change the numbers:
  - every conv is bias-free, followed by BatchNorm (eps 1e-3, inference form) and ReLU;
  - the pool branches of Mixed_5b-5d, 6b-6e and 7b average 3x3 windows over in-image
    pixels only (padding not counted); Mixed_7c's pool branch is a 3x3 max pool;
  - the classifier has 1008 outputs.

Block and branch names are pytorch-fid's (= torchvision's), so converted weights keep their
official names. Activations are NHWC; the network input is already preprocessed (see
`preprocess.py`), normally [B, 299, 299, 3].

Outputs (`__call__`):
  pool3            [B, 2048]  global average of Mixed_7c (FID features, TF `pool_3:0`)
  logits           [B, 1008]  fc with bias (pytorch-fid's classifier)
  logits_unbiased  [B, 1008]  pool3 @ fc.kernel, no bias: what ADM's Inception Score uses
  spatial          [B, h*w*7] Mixed_6d.branch1x1 after ReLU, first 7 channels, flattened in
                              (h, w, c) order (TF `mixed_6/conv:0`, sFID features; 2023 at 299)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

BN_EPS = 1e-3
NUM_CLASSES = 1008
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps channels [0, 7) of mixed_6/conv:0

# The forward, in order. Names are the pytorch-fid module names; the three pools have no
# parameters. Every entry is a separately callable stage (see `InceptionV3.stage`).
STAGES = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
          "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
          "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
          "AvgPool")


def _pad(kernel: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """'Same' padding of a stride-1 odd kernel, as torch's padding=(kh//2, kw//2)."""
    return ((kernel[0] // 2,) * 2, (kernel[1] // 2,) * 2)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 stride-2 max pool without padding (torch floor mode)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def avg_pool_3x3_inside(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the in-image pixels of each window (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def max_pool_3x3_s1(x: jax.Array) -> jax.Array:
    """3x3 stride-1 max pool padded by one pixel (padding never wins: it is -inf)."""
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (running statistics) -> ReLU: torchvision's BasicConv2d."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padded: bool = False  # 'same' padding for stride 1; stride-2 convs are never padded
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = _pad(self.kernel) if self.padded else "VALID"
        y = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                    padding=padding, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    precision=self.precision, name="conv")(x)
        # BatchNorm is an affine map at inference; it runs in float32 whatever the conv dtype.
        y = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=jnp.float32,
                         param_dtype=jnp.float32, name="bn")(y)
        return nn.relu(y).astype(self.dtype)


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    precision: Any = None

    def conv(self, features, kernel, name, stride=1, padded=None):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if padded is None:
            padded = stride == 1 and kernel != (1, 1)
        return BasicConv(features, kernel, stride, padded, self.dtype, self.precision, name=name)


class FIDInceptionA(_Block):
    """Mixed_5b-5d: [1x1, 5x5, 3x3dbl, avgpool->1x1]."""
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(64, 1, "branch1x1")(x)
        b5 = self.conv(48, 1, "branch5x5_1")(x)
        b5 = self.conv(64, 5, "branch5x5_2")(b5)
        b3 = self.conv(64, 1, "branch3x3dbl_1")(x)
        b3 = self.conv(96, 3, "branch3x3dbl_2")(b3)
        b3 = self.conv(96, 3, "branch3x3dbl_3")(b3)
        bp = self.conv(self.pool_features, 1, "branch_pool")(avg_pool_3x3_inside(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (35 -> 17): [3x3/2, 3x3dbl (last /2), maxpool/2]."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(384, 3, "branch3x3", stride=2)(x)
        bd = self.conv(64, 1, "branch3x3dbl_1")(x)
        bd = self.conv(96, 3, "branch3x3dbl_2")(bd)
        bd = self.conv(96, 3, "branch3x3dbl_3", stride=2)(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(_Block):
    """Mixed_6b-6e: [1x1, 1x7->7x1, 7x1->1x7->7x1->1x7, avgpool->1x1]."""
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv(192, 1, "branch1x1")(x)
        b7 = self.conv(c7, 1, "branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), "branch7x7_2")(b7)
        b7 = self.conv(192, (7, 1), "branch7x7_3")(b7)
        bd = self.conv(c7, 1, "branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_2")(bd)
        bd = self.conv(c7, (1, 7), "branch7x7dbl_3")(bd)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_4")(bd)
        bd = self.conv(192, (1, 7), "branch7x7dbl_5")(bd)
        bp = self.conv(192, 1, "branch_pool")(avg_pool_3x3_inside(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (17 -> 8): [1x1->3x3/2, 1x1->1x7->7x1->3x3/2, maxpool/2]."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(192, 1, "branch3x3_1")(x)
        b3 = self.conv(320, 3, "branch3x3_2", stride=2)(b3)
        b7 = self.conv(192, 1, "branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), "branch7x7x3_2")(b7)
        b7 = self.conv(192, (7, 1), "branch7x7x3_3")(b7)
        b7 = self.conv(192, 3, "branch7x7x3_4", stride=2)(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(_Block):
    """Mixed_7b (avg pool branch) and Mixed_7c (max pool branch):
    [1x1, 1x1->(1x3 | 3x1), 1x1->3x3->(1x3 | 3x1), pool->1x1]."""
    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(320, 1, "branch1x1")(x)
        b3 = self.conv(384, 1, "branch3x3_1")(x)
        b3 = jnp.concatenate([self.conv(384, (1, 3), "branch3x3_2a")(b3),
                              self.conv(384, (3, 1), "branch3x3_2b")(b3)], axis=-1)
        bd = self.conv(448, 1, "branch3x3dbl_1")(x)
        bd = self.conv(384, 3, "branch3x3dbl_2")(bd)
        bd = jnp.concatenate([self.conv(384, (1, 3), "branch3x3dbl_3a")(bd),
                              self.conv(384, (3, 1), "branch3x3dbl_3b")(bd)], axis=-1)
        pooled = max_pool_3x3_s1(x) if self.max_pool_branch else avg_pool_3x3_inside(x)
        bp = self.conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """fc: Linear(2048 -> 1008). Returns (logits with bias, logits without bias)."""
    precision: Any = None

    @nn.compact
    def __call__(self, pool3: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (POOL3_DIM, NUM_CLASSES),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,), jnp.float32)
        unbiased = jnp.dot(pool3, kernel, precision=self.precision)
        return unbiased + bias, unbiased


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 (NHWC). Input: preprocessed images [B, H, W, 3].

    `dtype` is the compute dtype of the convolutions (outputs are float32); `precision` is
    passed to every conv/matmul (None: the backend default; "highest" for float32 parity).
    """
    dtype: Dtype = jnp.float32
    precision: Any = "highest"

    def setup(self):
        kw = dict(dtype=self.dtype, precision=self.precision)
        self.Conv2d_1a_3x3 = BasicConv(32, (3, 3), stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, (3, 3), **kw)
        self.Conv2d_2b_3x3 = BasicConv(64, (3, 3), padded=True, **kw)
        self.Conv2d_3b_1x1 = BasicConv(80, (1, 1), **kw)
        self.Conv2d_4a_3x3 = BasicConv(192, (3, 3), **kw)
        self.Mixed_5b = FIDInceptionA(pool_features=32, **kw)
        self.Mixed_5c = FIDInceptionA(pool_features=64, **kw)
        self.Mixed_5d = FIDInceptionA(pool_features=64, **kw)
        self.Mixed_6a = InceptionB(**kw)
        self.Mixed_6b = FIDInceptionC(channels_7x7=128, **kw)
        self.Mixed_6c = FIDInceptionC(channels_7x7=160, **kw)
        self.Mixed_6d = FIDInceptionC(channels_7x7=160, **kw)
        self.Mixed_6e = FIDInceptionC(channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(**kw)
        self.Mixed_7b = FIDInceptionE(max_pool_branch=False, **kw)
        self.Mixed_7c = FIDInceptionE(max_pool_branch=True, **kw)
        self.fc = Classifier(precision=self.precision)

    def stage(self, name: str, x: jax.Array) -> jax.Array:
        """One entry of STAGES applied to its input (the previous stage's output)."""
        if name in ("MaxPool_1", "MaxPool_2"):
            return max_pool_3x3_s2(x)
        if name == "AvgPool":  # AdaptiveAvgPool2d(1), kept 4-D like torch's [B, C, 1, 1]
            return jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        if name not in STAGES:
            raise ValueError(f"unknown Inception stage {name!r}; stages are {STAGES}")
        return getattr(self, name)(x)

    def __call__(self, x: jax.Array, return_stages: bool = False) -> dict[str, jax.Array]:
        """x: [B, H, W, 3] preprocessed (about [-1, 1]). Returns the dict described in the
        module docstring; with `return_stages`, also "stages": {name: output} for STAGES."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"Inception input must be [B, H, W, 3] NHWC, got shape {x.shape}")
        stages = {}
        h = x.astype(self.dtype)
        for name in STAGES:
            h = self.stage(name, h)
            stages[name] = h
        # Mixed_6d concatenates branch1x1 first, so its channels [0, 7) are mixed_6/conv:0's.
        mixed_6d = stages["Mixed_6d"].astype(jnp.float32)
        spatial = mixed_6d[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        pool3 = stages["AvgPool"].reshape(x.shape[0], POOL3_DIM)
        logits, logits_unbiased = self.fc(pool3)
        out = {"pool3": pool3, "logits": logits, "logits_unbiased": logits_unbiased,
               "spatial": spatial}
        if return_stages:
            out["stages"] = stages
        return out
