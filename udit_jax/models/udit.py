"""U-DiT: the U-shaped diffusion transformer with token-downsampled attention (arXiv 2405.02730).

A port of the official `udit_models.py` (NHWC here). Structure, for hidden size C:

    stem 3x3 conv -> enc1 (C, HxW, c1) -> down -> enc2 (2C, H/2, c2) -> down -> latent (4C, H/4, c3)
    -> up, concat skip2, 1x1 -> dec2 (2C, H/2, c2) -> up, concat skip1, 1x1 -> dec1 (2C, H, c2)
    -> 3x3 conv -> final layer (norm, modulate with c2, 3x3 conv)

Each `UDiTBlock` holds TWO adaLN-Zero transformer sublayers (attn1/mlp1, attn2/mlp2), as the
official code does. Three timestep+label embedders (widths C, 2C, 4C) condition the stages.
The options of the official constructor all work (attn_type, posemb_type, ffn_type, rep,
downsampler, down_shortcut, down_factor, mlp_ratio, depth); `attn_downsample` adds the
paper's ablations: full attention ('none') and key/value-only downsampling ('kv'), and
`patch_size` p > 1 runs the whole network on p x p patches (pixel-unshuffle in, pixel-shuffle
out), so a pixel-space model's stages work at 1/p of the image side with p*p times the
input channels (cheap on a CPU; p = 1 is the official model).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from udit_jax.models import layers
from udit_jax.models.layers import conv, dense, layer_norm, modulate

_OFFICIAL_LOGIT_CAP = 4.6052
STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")


# ----------------------------------------------------------------------------- shuffles
def pixel_unshuffle(x: jax.Array, f: int = 2) -> jax.Array:
    """PyTorch PixelUnshuffle in NHWC: [B, H, W, C] -> [B, H/f, W/f, C*f*f].

    Output channel c*f*f + i*f + j holds pixel (f*h + i, f*w + j) of channel c (PyTorch's
    order, not space_to_depth's).
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // f, w // f, c * f * f)


def pixel_shuffle(x: jax.Array, f: int = 2) -> jax.Array:
    """PyTorch PixelShuffle in NHWC: [B, h, w, C*f*f] -> [B, h*f, w*f, C] (inverse of above)."""
    b, h, w, cff = x.shape
    c = cff // (f * f)
    x = x.reshape(b, h, w, c, f, f)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * f, w * f, c)


def polyphase_split(x: jax.Array, f: int) -> jax.Array:
    """[B, H, W, d] -> [B, f*f, (H/f)*(W/f), d]: group p = i*f + j takes pixels (f*h+i, f*w+j).

    Strided sub-grids (not windows), tokens row-major within each sub-grid.
    """
    b, h, w, d = x.shape
    x = x.reshape(b, h // f, f, w // f, f, d).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, f * f, (h // f) * (w // f), d)


def polyphase_merge(x: jax.Array, f: int, h: int, w: int) -> jax.Array:
    """Inverse of polyphase_split: [B, f*f, (h/f)*(w/f), d] -> [B, h, w, d]."""
    b, _, _, d = x.shape
    x = x.reshape(b, f, f, h // f, w // f, d).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, h, w, d)


# ----------------------------------------------------------------------------- RoPE
def rope2d_angles(num_tokens: int, head_dim: int, positions: np.ndarray | None = None) -> np.ndarray:
    """The official RoPE2D angle table [N, head_dim/2] in float32.

    Token n of a square grid of side s = floor(sqrt(N)) sits at column n % s, row n // s;
    pair 2m rotates by column * f_m, pair 2m+1 by row * f_m, f_m = 10000^(-4m/head_dim).
    `positions` ([N, 2] float (col, row)) replaces the grid positions when given.
    """
    freqs = (1.0 / (np.float32(10000.0) ** (np.arange(0, head_dim, 4, dtype=np.float32)[: head_dim // 4]
                                              / np.float32(head_dim)))).astype(np.float32)
    if positions is None:
        side = int(num_tokens ** 0.5)
        n = np.arange(num_tokens)
        positions = np.stack([n % side, n // side], axis=-1)
    positions = positions.astype(np.float32)
    angles = np.stack([np.outer(positions[:, 0], freqs), np.outer(positions[:, 1], freqs)], axis=-1)
    return angles.reshape(len(positions), -1).astype(np.float32)


def apply_rope(x: jax.Array, angles: np.ndarray) -> jax.Array:
    """The official RoPE, on channels stored de-interleaved: x [..., N, heads, hd] holds each
    head's channels in the order [0, 2, ..., hd-2, 1, 3, ..., hd-1] (the pairs' first members,
    then their second); each pair (2k, 2k+1) is rotated by angles [N, hd/2] and returned in
    the same order.

    The official code interleaves the pairs; for attention logits the order does not matter
    as long as queries and keys share it (dot products and norms are invariant under one
    permutation of both). `DeinterleavedQKV` makes q and k in this order by permuting its weight
    columns, so no strided slice of every query and key is needed: on TPUs those slices, and
    the strided pads of their gradients, were standalone copies through HBM.

    Computes in x's dtype, the tables rounded to it. In float32 that is the official
    arithmetic. Upstream rotates bfloat16 inputs in float32 and casts back; here bfloat16 q
    and k are rotated in bfloat16, within 2 bfloat16 roundings of that (one more than the
    cast), before the cosine normalisation ('v2') and the attention's bfloat16 matmuls.
    Rotating in float32 made XLA keep the rotated q and k in float32 through HBM for the
    backward (it drops the round trip through bfloat16): U-DiT-L's decoder level-1
    attention on v5p (64 images, forward and backward, XLA's cost model) takes 9.00 ms
    against 9.69 ms, its default train step on v5p-8 273.9 ms against 285.8 ms.
    """
    half = x.shape[-1] // 2
    re, im = x[..., :half], x[..., half:]
    cos = jnp.asarray(np.cos(angles), x.dtype)[:, None, :]
    sin = jnp.asarray(np.sin(angles), x.dtype)[:, None, :]
    return jnp.concatenate([re * cos - im * sin, re * sin + im * cos], axis=-1)


# ----------------------------------------------------------------------------- attention
def _l2_normalize(a: jax.Array) -> jax.Array:
    """F.normalize(a, dim=-1) in float32: a / max(|a|, 1e-12), as one multiply by an rsqrt
    (a broadcast division costs several times more on a CPU)."""
    a = a.astype(jnp.float32)
    return a * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), 1e-24))


class DeinterleavedQKV(nn.Module):
    """The official `to_qkv` Linear (`layers.fused_qkv_params`): x [..., d] -> (q, k, v),
    each [..., d].

    With `rope_heads` (RoPE2D follows), q's and k's channels come out in each head's
    `apply_rope` order: the weight's columns are permuted (a [d, 3d] transpose per step), not
    the activations. v keeps the official order. (U-DiT-L's level-1 attention on v5p, forward
    and backward by XLA's cost model: 9.69 ms against 10.67 ms with strided slices.) Computed
    by `layers.qkv_projection` (three matmuls on v4, v5e and v5p TPUs, one elsewhere).
    """

    dim: int
    rope_heads: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        d = self.dim
        kernel, bias = layers.fused_qkv_params(self, x.shape[-1], d)
        if self.rope_heads:
            # Each head's (hd/2, 2) pairs transposed to (2, hd/2), as a transpose of q's and
            # k's weight columns (a gather would be unpriced by XLA:TPU's cost model).
            def order(w):
                lead = w.shape[:-1]
                q, k, v = jnp.split(w, 3, axis=-1)
                q, k = (a.reshape(*lead, self.rope_heads, -1, 2).swapaxes(-1, -2).reshape(*lead, d)
                        for a in (q, k))
                return jnp.concatenate([q, k, v], axis=-1)
            kernel, bias = order(kernel), order(bias)
        return layers.qkv_projection(x.astype(self.dtype), kernel.astype(self.dtype),
                                     bias.astype(self.dtype))


class DownsampledAttention(nn.Module):
    """The official `DownSample_Attn`, NHWC.

    x: [B, H, W, d] -> [B, H, W, d]. Depthwise conv (+ shortcut), then attention inside each of
    the f*f polyphase sub-grids ('tokens', official), over all tokens ('none'), or with
    full-resolution queries against f x f average-pooled keys/values ('kv'); cosine attention
    with a capped learned per-head scale ('v2') or scaled dot product (None); RoPE2D on q, k.
    """

    dim: int
    num_heads: int
    down_factor: int = 2
    attn_type: str | None = "v2"
    posemb_type: str | None = "rope2d"
    downsampler: str | None = "dwconv5"
    down_shortcut: int = 1
    attn_downsample: str = "tokens"
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, d = x.shape
        heads, hd, f = self.num_heads, d // self.num_heads, self.down_factor
        z = x
        if self.downsampler is not None:
            k = int(self.downsampler[-1])
            z = layers.DepthwiseConv(d, k, ("embed", "embed"), self.dtype, name="downsampler_layer")(x)
            if self.down_shortcut:
                z = z + x
        qkv = DeinterleavedQKV(d, heads if self.posemb_type == "rope2d" else None, self.dtype,
                               name="to_qkv")

        if self.attn_downsample == "tokens":
            tokens = polyphase_split(z, f).reshape(b * f * f, (h // f) * (w // f), d)
            q, k_, v = qkv(tokens)
            q_angles = kv_angles = rope2d_angles(tokens.shape[1], hd)
        elif self.attn_downsample == "none":
            tokens = z.reshape(b, h * w, d)
            q, k_, v = qkv(tokens)
            q_angles = kv_angles = rope2d_angles(h * w, hd)
        elif self.attn_downsample == "kv":
            tokens = z.reshape(b, h * w, d)
            pooled = z.reshape(b, h // f, f, w // f, f, d).mean(axis=(2, 4)).reshape(b, -1, d)
            q = qkv(tokens)[0]
            _, k_, v = qkv(pooled)
            # Queries sit at (col, row)/f in pooled-grid units; pooled cells at their centres.
            n = np.arange(h * w)
            q_pos = np.stack([(n % w) / f, (n // w) / f], axis=-1)
            m = np.arange((h // f) * (w // f))
            kv_pos = np.stack([m % (w // f), m // (w // f)], axis=-1) + (f - 1) / (2 * f)
            q_angles, kv_angles = rope2d_angles(h * w, hd, q_pos), rope2d_angles(len(m), hd, kv_pos)
        else:
            raise ValueError(f"attn_downsample must be 'tokens', 'kv' or 'none', got {self.attn_downsample!r}")

        split_heads = lambda a: a.reshape(a.shape[0], a.shape[1], heads, hd)
        q, k_, v = split_heads(q), split_heads(k_), split_heads(v)
        if self.posemb_type == "rope2d":
            q, k_ = apply_rope(q, q_angles), apply_rope(k_, kv_angles)
        if self.attn_type == "v2":
            logit_scale = self.param("logit_scale", layers.with_axes(
                nn.initializers.constant(math.log(10.0)), ("heads",)), (heads,), jnp.float32)
            scale = jnp.exp(jnp.minimum(logit_scale, _OFFICIAL_LOGIT_CAP))
            q, k_ = _l2_normalize(q), _l2_normalize(k_)
            q = (q * scale[:, None]).astype(self.dtype)
            k_ = k_.astype(self.dtype)
            out = layers.attention(q, k_, v, scale=1.0, implementation=self.attention_impl)
        else:
            out = layers.attention(q, k_, v, scale=hd ** -0.5, implementation=self.attention_impl)
        out = out.reshape(out.shape[0], out.shape[1], d)

        if self.attn_downsample == "tokens":
            out = polyphase_merge(out.reshape(b, f * f, -1, d), f, h, w)
        else:
            out = out.reshape(b, h, w, d)
        return conv(d, 1, ("embed", "embed"), name="to_out", dtype=self.dtype)(out)


# ----------------------------------------------------------------------------- FFNs
class RepFeedForward(nn.Module):
    """The official re-parameterisable FFN (ffn_type='rep', rep=1), training form.

    x: [B, H, W, d] -> [B, H, W, d]:
    1x1 (d -> h/2) -> 1x1 (h/2 -> h) -> exact GELU -> a + dw5(a) + dw3(a) + dw1(a)
    -> 1x1 (h -> h/2) -> 1x1 (h/2 -> d), h = int(d * mlp_ratio).

    The identity and the three depthwise branches are linear in `a`, so they run as ONE
    depthwise 5x5 conv whose kernel is their sum (same params, same gradients): a third of
    the depthwise convs to compile and to stream the h-wide activation through. Each pair
    of 1x1 convs is linear too (`pointwise_pair`): off CPUs, where a device holds enough
    tokens (`composing_pays`), the pair runs as one 1x1 conv with the product of its kernels
    (same params; autodiff takes the gradients through the product).
    """

    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = self.hidden
        compose = composing_pays(x.size // x.shape[-1] // layers.batch_shards(), self.dim, h)

        def pair(x, name, widths, axes):   # 1x1 (widths[0] -> widths[1]) -> 1x1 (-> widths[2])
            first = _PointwiseParams(widths[1], axes[0], name=f"{name}_0")(widths[0])
            second = _PointwiseParams(widths[2], axes[1], name=f"{name}_1")(widths[1])
            run = lambda composed: lambda x, *p: pointwise_pair(x, *p, self.dtype, composed)  # noqa: E731
            return layers.per_platform(x, first, second, cpu=run(False), default=run(compose))

        a = layers.gelu_exact(pair(x, "project_in", (self.dim, h // 2, h),
                                   (("embed", "mlp"), ("mlp", "mlp"))))
        branches = [_DepthwiseParams(h, k, name=f"dwconv_{i}")() for i, k in enumerate((5, 3, 1))]
        kernel, bias = merge_depthwise_branches(*branches)
        # One depthwise conv with the summed kernel (shifted multiply-adds on CPUs).
        out = layers.depthwise_conv(a, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return pair(out, "project_out", (h, h // 2, self.dim), (("mlp", "mlp"), ("mlp", "embed")))


def pointwise_pair(x, first, second, dtype, composed: bool):
    """Two 1x1 convs, x [..., a] -> [..., c], from their params (first: kernel [1, 1, a, b],
    bias [b]; second: kernel [1, 1, b, c], bias [c]): one after the other, or `composed` as
    one conv with kernel K1 K2 and bias b1 K2 + b2 (multiplied in float32, all passes when
    the compute dtype is float32): a*c instead of (a + c)*b MACs per token.

    U-DiT-L's v5p-8 train step (64 images per chip) by XLA's cost model: 377.7 -> 365.7 ms,
    40.2 -> 37.0 GiB per chip. On a CPU, U-DiT-S's train step (batch 4) measured about 6%
    slower composed, in one process alternating with the two-conv form, so CPUs keep it.
    """
    if not composed:
        return layers.pointwise(layers.pointwise(x, *first, dtype), *second, dtype)
    (k1, b1), (k2, b2) = first, second
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    mm = functools.partial(jnp.matmul, precision=precision)
    return layers.pointwise(x, mm(k1, k2), mm(b1, k2[0, 0]) + b2, dtype)


def composing_pays(tokens: int, dim: int, hidden: int) -> bool:
    """Whether the rep FFN's 1x1 pairs (d -> h/2 -> h and back) run composed, for `tokens`
    tokens per device: per token that saves h(h - d)/2 of the (d + h)h/2 MACs, each way; the
    kernel product costs d*h*h/2 MACs per step (three times with its gradients, as the
    saving). Composed where the saving is at least twice that cost: U-DiT-L at 64 images
    per chip composes every level but the middle one (4096 tokens, d = 1536)."""
    return tokens * (hidden - dim) >= 2 * dim * hidden


class _PointwiseParams(nn.Module):
    """The params of a 1x1 conv, named, shaped and initialised as `layers.conv(features, 1,
    axes)` makes them: (fan_in) -> (kernel [1, 1, fan_in, features], bias [features])."""

    features: int
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, fan_in: int):
        kernel_init, bias_init = layers.conv_inits(self.axes)
        return (self.param("kernel", kernel_init, (1, 1, fan_in, self.features), jnp.float32),
                self.param("bias", bias_init, (self.features,), jnp.float32))


class _DepthwiseParams(nn.Module):
    """The params of a depthwise k x k conv over `features` channels, named and initialised
    as `layers.conv(features, k, ("mlp", "mlp"), groups=features)` names and initialises them:
    () -> (kernel [k, k, 1, features], bias [features])."""

    features: int
    size: int

    @nn.compact
    def __call__(self):
        k = self.size
        kernel = self.param("kernel", layers.with_axes(layers.xavier_uniform, ("conv_h", "conv_w", "mlp", "mlp")),
                            (k, k, 1, self.features), jnp.float32)
        bias = self.param("bias", layers.with_axes(layers.zeros, ("mlp",)), (self.features,), jnp.float32)
        return kernel, bias


def merge_depthwise_branches(dw5, dw3, dw1):
    """identity + dw5 + dw3 + dw1 as one depthwise 5x5 conv: (kernel [5, 5, 1, h], bias [h]).

    Each argument is (kernel [k, k, 1, h], bias [h]); the smaller kernels and the identity add
    into the 5x5 kernel's centre.
    """
    k5 = jnp.asarray(dw5[0])
    k5 = k5.at[1:4, 1:4].add(dw3[0])
    k5 = k5.at[2:3, 2:3].add(dw1[0] + 1.0)
    return k5, dw5[1] + dw3[1] + dw1[1]


class ConvFeedForward(nn.Module):
    """1x1 (d -> h) -> exact GELU -> depthwise 5x5 -> 1x1 (h -> d). x: [B, H, W, d].

    This is the official FFN with rep=0, and also the inference (fused) form of
    RepFeedForward, whose identity and 3x3/1x1 branches fold into the 5x5 kernel.
    """

    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.gelu_exact(conv(self.hidden, 1, ("embed", "mlp"), name="project_in", dtype=self.dtype)(x))
        x = layers.DepthwiseConv(self.hidden, 5, ("mlp", "mlp"), self.dtype, name="dwconv")(x)
        return conv(self.dim, 1, ("mlp", "embed"), name="project_out", dtype=self.dtype)(x)


class BasicMlp(nn.Module):
    """ffn_type='basic': 1x1 (d -> h) -> tanh GELU -> 1x1 (h -> d). x: [B, H, W, d]."""

    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.gelu_tanh(conv(self.hidden, 1, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x))
        return conv(self.dim, 1, ("mlp", "embed"), name="fc2", dtype=self.dtype)(x)


def ffn_hidden(dim: int, mlp_ratio: float) -> int:
    return int(dim * mlp_ratio)


# ----------------------------------------------------------------------------- blocks
class UDiTBlock(nn.Module):
    """Two adaLN-Zero sublayers (attn_k + mlp_k with adaLN_modulation_k, k = 1, 2).

    x: [B, H, W, d], c: [B, d] -> [B, H, W, d].
    """

    dim: int
    num_heads: int
    mlp_ratio: float
    down_factor: int
    ffn_type: str
    rep: int
    fused_ffn: bool
    attn_kwargs: dict
    dtype: Any = jnp.float32

    def ffn(self, k: int) -> nn.Module:
        hidden = ffn_hidden(self.dim, self.mlp_ratio)
        if self.ffn_type == "basic":
            return BasicMlp(self.dim, hidden, self.dtype, name=f"mlp{k}")
        if self.rep and not self.fused_ffn:
            return RepFeedForward(self.dim, hidden, self.dtype, name=f"mlp{k}")
        return ConvFeedForward(self.dim, hidden, self.dtype, name=f"mlp{k}")

    @nn.compact
    def __call__(self, x, c):
        d = self.dim
        x = layers.constrain_activations(x)
        for k in (1, 2):
            mod = dense(6 * d, ("embed", "mlp"), name=f"adaLN_modulation{k}", dtype=self.dtype,
                        kernel_init=layers.zeros)(nn.silu(c))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
            attn = DownsampledAttention(d, self.num_heads, self.down_factor, dtype=self.dtype,
                                        name=f"attn{k}", **self.attn_kwargs)
            x = x + gate_msa[:, None, None] * attn(modulate(layer_norm(x), shift_msa, scale_msa))
            x = x + gate_mlp[:, None, None] * self.ffn(k)(modulate(layer_norm(x), shift_mlp, scale_mlp))
        return layers.constrain_activations(x)


class FinalLayer(nn.Module):
    """LayerNorm, modulate with c, 3x3 conv to the output channels. x: [B, H, W, d]."""

    dim: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        mod = dense(2 * self.dim, ("embed", "mlp"), name="adaLN_modulation", dtype=self.dtype,
                    kernel_init=layers.zeros)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale)
        return conv(self.out_channels, 3, ("embed", None), name="out_proj", dtype=self.dtype,
                    kernel_init=layers.zeros)(x)


# xavier on the stem conv's flattened (out, in*kh*kw) view, as the official init.
_stem_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


class UDiT(nn.Module):
    """U-DiT. Fields use the official constructor's names; defaults are its defaults.

    __call__(x [B, H, W, in_channels], t [B], y [B], train=False) -> [B, H, W, out_channels].
    With train=True labels are dropped with class_dropout_prob, each of the three stage
    embedders drawing its own mask from the 'label_dropout' RNG stream (as upstream).
    """

    input_size: int = 32
    down_factor: int | tuple[int, ...] = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: tuple[int, ...] = (2, 5, 8, 5, 2)
    num_heads: int = 16
    mlp_ratio: float = 4
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    rep: int = 1
    ffn_type: str = "rep"
    attn_type: str | None = None
    posemb_type: str | None = None
    downsampler: str | None = None
    down_shortcut: int = 0
    # Port options.
    attn_downsample: str = "tokens"     # 'tokens' (official) | 'kv' | 'none' (full attention)
    patch_size: int = 1                 # p > 1: stages run on [B, S/p, S/p, C*p*p] patches
    fused_ffn: bool = False             # inference form of the 'rep' FFN (see fuse_ffn_params)
    cfg_channels: int | None = 3        # channels forward_with_cfg guides; None = all
    dtype: Any = jnp.float32
    remat: bool = False                 # recompute blocks in the backward but what
    remat_keeps: str = "outputs"        # layers.remat_policy keeps ('outputs', 'attention', 'inputs')
    # jax.default_matmul_precision for this model's matmuls (None: JAX's default; 'bfloat16':
    # JAX's default on TPUs and GPUs, one bfloat16 pass on CPUs, see layers.one_bf16_pass).
    matmul_precision: str | None = None
    attention_impl: str | None = None
    # The blocks of a stage as one scanned block with stacked params (leading axis = depth):
    # XLA compiles each stage's block once instead of once per block. Param tree
    # {"encoder_level_2": {... [depth, ...]}} instead of {"encoder_level_2_0": ..., ...};
    # stack_blocks / unstack_blocks convert, the official state_dict is the same.
    scan_blocks: bool = False

    # ------------------------------------------------------------------ config
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def down_factors(self) -> tuple[int, ...]:
        f = self.down_factor
        return tuple(f) if isinstance(f, (tuple, list)) else (f,) * 5

    @property
    def stage_widths(self) -> tuple[int, ...]:
        c = self.hidden_size
        return (c, 2 * c, 4 * c, 2 * c, 2 * c)

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        s = self.input_size // self.patch_size
        return (s, s // 2, s // 4, s // 2, s)

    def validate(self) -> None:
        """Raises ValueError naming the problem for configurations the model cannot run."""
        problems = []
        c, s, p = self.hidden_size, self.input_size, self.patch_size
        if len(self.depth) != 5:
            problems.append(f"depth must list 5 stage depths (enc1, enc2, latent, dec2, dec1), got {self.depth}")
        if len(self.down_factors) != 5 or any(f < 1 for f in self.down_factors):
            problems.append(f"down_factor must be a positive int or 5 of them, got {self.down_factor}")
        if c % 2:
            problems.append(f"hidden_size must be even (the first Downsample halves it), got {c}")
        if p < 1 or s % (4 * p):
            problems.append(f"input_size must be divisible by 4 * patch_size (patching, then two 2x "
                            f"downsamplings), got input_size={s}, patch_size={p}")
        for name, width, size, f in zip(STAGES, self.stage_widths, self.stage_sizes, self.down_factors):
            if width % self.num_heads:
                problems.append(f"{name}: width {width} is not divisible by num_heads={self.num_heads}")
            elif self.posemb_type == "rope2d" and (width // self.num_heads) % 4:
                problems.append(f"{name}: RoPE2D needs head_dim divisible by 4, got {width // self.num_heads}")
            if self.attn_downsample != "none" and size % f:
                problems.append(f"{name}: side {size} is not divisible by down_factor {f}")
        if self.attn_type not in (None, "v2"):
            problems.append(f"attn_type must be None or 'v2', got {self.attn_type!r}")
        if self.posemb_type not in (None, "rope2d"):
            problems.append(f"posemb_type must be None or 'rope2d', got {self.posemb_type!r}")
        if self.ffn_type not in ("rep", "basic"):
            problems.append(f"ffn_type must be 'rep' or 'basic', got {self.ffn_type!r}")
        if self.downsampler is not None and not (self.downsampler.startswith("dwconv")
                                                 and self.downsampler[-1].isdigit()
                                                 and int(self.downsampler[-1]) % 2 == 1):
            problems.append(f"downsampler must be None or 'dwconvK' with odd K, got {self.downsampler!r}")
        if self.attn_downsample not in ("tokens", "kv", "none"):
            problems.append(f"attn_downsample must be 'tokens', 'kv' or 'none', got {self.attn_downsample!r}")
        if self.fused_ffn and not self.has_rep_ffn:
            problems.append("fused_ffn=True needs ffn_type='rep' with rep=1")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            # More than out_channels guides them all, as the official [:, :3] slice does.
            problems.append(f"cfg_channels must be a positive int or None, got {self.cfg_channels}")
        if problems:
            raise ValueError("invalid U-DiT configuration:\n  " + "\n  ".join(problems))

    @property
    def has_rep_ffn(self) -> bool:
        return self.ffn_type == "rep" and bool(self.rep)

    def inference_form(self) -> "UDiT":
        """The model as used for sampling: re-parameterised (fused) FFNs when available."""
        return self.clone(fused_ffn=True) if self.has_rep_ffn else self

    def example_inputs(self, batch: int = 1):
        s = self.input_size
        return (jnp.zeros((batch, s, s, self.in_channels), jnp.float32),
                jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

    def fixed_param_count(self) -> int:
        return 0

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x, t, y):
        s, c = self.input_size, self.in_channels
        if x.ndim != 4 or x.shape[1:] != (s, s, c):
            raise ValueError(f"U-DiT expects x of shape [B, {s}, {s}, {c}] (NHWC), got {tuple(x.shape)}; "
                             "build the model with the matching input_size/in_channels "
                             "(PyTorch NCHW arrays need x.transpose(0, 2, 3, 1))")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape [{x.shape[0]}], got {tuple(t.shape)} and {tuple(y.shape)}")

    @nn.compact
    @layers.at_matmul_precision
    def __call__(self, x, t, y, train: bool = False):
        self._check_inputs(x, t, y)
        dtype = self.dtype
        x = x.astype(dtype)
        c, p = self.hidden_size, self.patch_size
        if p > 1:
            x = pixel_unshuffle(x, p)
        cond = []
        for k, width in enumerate((c, 2 * c, 4 * c), start=1):
            t_emb = layers.TimestepEmbedder(width, dtype=dtype, name=f"t_embedder_{k}")(t)
            y_emb = layers.LabelEmbedder(self.num_classes, width, self.class_dropout_prob, dtype=dtype,
                                         name=f"y_embedder_{k}")(y, train)
            cond.append(t_emb + y_emb)
        c1, c2, c3 = cond
        stage_cond = (c1, c2, c3, c2, c2)

        x = conv(c, 3, ("embed", "embed"), name="x_embedder", dtype=dtype, kernel_init=_stem_init)(x)
        block_cls = (nn.remat(UDiTBlock, policy=layers.remat_policy(self.remat_keeps))
                     if self.remat else UDiTBlock)
        attn_kwargs = dict(attn_type=self.attn_type, posemb_type=self.posemb_type,
                           downsampler=self.downsampler, down_shortcut=self.down_shortcut,
                           attn_downsample=self.attn_downsample, attention_impl=self.attention_impl)

        def run_stage(i, h):
            block_args = (self.stage_widths[i], self.num_heads, self.mlp_ratio, self.down_factors[i],
                          self.ffn_type, self.rep, self.fused_ffn, attn_kwargs, dtype)
            if self.scan_blocks and self.depth[i]:
                scan = nn.scan(lambda block, h, c: (block(h, c), None), variable_axes={"params": 0},
                               split_rngs={"params": True}, in_axes=nn.broadcast,
                               length=self.depth[i], metadata_params={nn.PARTITION_NAME: None})
                return scan(block_cls(*block_args, name=STAGES[i]), h, stage_cond[i])[0]
            for j in range(self.depth[i]):
                h = block_cls(*block_args, name=f"{STAGES[i]}_{j}")(h, stage_cond[i])
            return h

        def down(name, h, width):  # 3x3 conv to width/2, then pixel-unshuffle: 2*width at half size
            return pixel_unshuffle(conv(width // 2, 3, ("embed", "embed"), name=name, dtype=dtype,
                                        use_bias=False)(h))

        def up(name, h, width):  # 3x3 conv to 2*width, then pixel-shuffle: width/2 at double size
            return pixel_shuffle(conv(2 * width, 3, ("embed", "embed"), name=name, dtype=dtype,
                                      use_bias=False)(h))

        skip1 = run_stage(0, x)
        skip2 = run_stage(1, down("down1_2", skip1, c))
        h = run_stage(2, down("down2_3", skip2, 2 * c))
        h = jnp.concatenate([up("up3_2", h, 4 * c), skip2], axis=-1)
        h = conv(2 * c, 1, ("embed", "embed"), name="reduce_chan_level2", dtype=dtype)(h)
        h = run_stage(3, h)
        h = jnp.concatenate([up("up2_1", h, 2 * c), skip1], axis=-1)
        h = conv(2 * c, 1, ("embed", "embed"), name="reduce_chan_level1", dtype=dtype)(h)
        h = run_stage(4, h)
        h = conv(2 * c, 3, ("embed", "embed"), name="output", dtype=dtype)(h)
        out = FinalLayer(2 * c, self.out_channels * p * p, dtype, name="final_layer")(h, c2)
        if p > 1:
            out = pixel_shuffle(out, p)
        return out.astype(jnp.float32)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance as the official samplers call it.

        x: [2B, H, W, C] (only the first half is read; it is duplicated), t: [2B],
        y: [2B] = [labels; null class]. Guides the first `cfg_channels` channels.
        """
        layers.require_null_class(self.class_dropout_prob)
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch ([cond; uncond] halves), got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        return layers.guided_output(out, cfg_scale, self.cfg_channels)

    # ------------------------------------------------------------------ statistics
    def count_macs(self) -> int:
        """Forward MACs for one example, counted like torchprofile on the official graph.

        Linear/conv/matmul MACs plus one per output element of each elementwise multiply
        (modulate, gates, RoPE, attention scale, timestep features); norms without affine,
        softmax, GELU and adds count zero. Matches the official U-DiT-S/B/L counts to within
        about 1e-6 relative (the paper's "GFLOPs" are the fused counts).
        """
        p = self.patch_size
        c, s, cin = self.hidden_size, self.input_size // p, self.in_channels * p * p
        macs = 0
        for width in (c, 2 * c, 4 * c):  # embedders: arange*scalar, t*freqs, two linears
            macs += 128 + 128 + 256 * width + width * width
        hw = s * s
        macs += hw * c * cin * 9
        for i, n in enumerate(self.depth):
            d, side, f = self.stage_widths[i], self.stage_sizes[i], self.down_factors[i]
            macs += n * 2 * self._sublayer_macs(d, side * side, f)
        q = hw // 4
        macs += hw * (c // 2) * c * 9 + q * c * 2 * c * 9          # down1_2, down2_3
        macs += (hw // 16) * 8 * c * 4 * c * 9 + q * 2 * c * 4 * c  # up3_2, reduce_chan_level2
        macs += q * 4 * c * 2 * c * 9 + hw * 2 * c * 2 * c          # up2_1, reduce_chan_level1
        macs += hw * 2 * c * 2 * c * 9                              # output
        macs += 2 * c * 4 * c + hw * 2 * c + hw * self.out_channels * p * p * 2 * c * 9  # final layer
        return macs

    def _sublayer_macs(self, d: int, hw: int, f: int) -> int:
        heads = self.num_heads
        macs = d * 6 * d + 4 * hw * d  # adaLN linear; two modulates and two gates
        if self.downsampler is not None:
            macs += hw * d * int(self.downsampler[-1]) ** 2
        if self.attn_downsample == "tokens":
            groups, nq, nk = f * f, hw // (f * f), hw // (f * f)
            macs += hw * d * 3 * d                       # qkv projection
        elif self.attn_downsample == "none":
            groups, nq, nk = 1, hw, hw
            macs += hw * d * 3 * d
        else:  # 'kv': queries on all tokens, keys/values on f x f pooled tokens
            groups, nq, nk = 1, hw, hw // (f * f)
            macs += nk * d + hw * d * d + nk * d * 2 * d  # pooling, q projection, k/v projection
        if self.posemb_type == "rope2d":
            macs += (groups * nq + groups * nk) * d // 2  # complex multiplies of q and k
        macs += 2 * groups * nq * nk * d                  # q k^T and attn v
        macs += groups * heads * nq * nk                  # logit scale
        macs += hw * d * d                                # to_out
        h = ffn_hidden(d, self.mlp_ratio)
        if self.ffn_type == "basic":
            macs += 2 * hw * d * h
        elif self.has_rep_ffn and not self.fused_ffn:
            macs += hw * (d * (h // 2) + (h // 2) * h + h * (25 + 9 + 1) + h * (h // 2) + (h // 2) * d)
        else:
            macs += hw * (d * h + h * 25 + h * d)
        return macs


# ----------------------------------------------------------------------------- re-parameterisation
_REP_FFN_KEYS = {"project_in_0", "project_in_1", "dwconv_0", "dwconv_1", "dwconv_2",
                 "project_out_0", "project_out_1"}


def _fuse_one_ffn(p: dict) -> dict:
    """Training-form FFN params -> ConvFeedForward params (float32, highest precision).

    1x1 convs compose as matrices: (x W_a + b_a) W_b + b_b = x (W_a W_b) + (b_a W_b + b_b);
    the depthwise 3x3 and 1x1 kernels and the identity add into the 5x5 kernel's centre.
    """
    mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    def compose(first, second):
        wa, wb = jnp.asarray(first["kernel"][0, 0]), jnp.asarray(second["kernel"][0, 0])
        return {"kernel": mm(wa, wb)[None, None], "bias": mm(first["bias"], wb) + second["bias"]}
    k5, b5 = merge_depthwise_branches(*((p[f"dwconv_{i}"]["kernel"], p[f"dwconv_{i}"]["bias"])
                                        for i in range(3)))
    return {
        "project_in": compose(p["project_in_0"], p["project_in_1"]),
        "dwconv": {"kernel": k5, "bias": b5},
        "project_out": compose(p["project_out_0"], p["project_out_1"]),
    }


def fuse_ffn_params(params):
    """Params of `model.inference_form()` from training-form params: a pure function.

    Every re-parameterisable FFN is folded into one 1x1 -> GELU -> dw5x5 -> 1x1 chain; all
    other params are returned unchanged (the input is never modified). Unlike the official
    `model.eval()`, calling this any number of times on the same params gives the same result.
    Stacked stages (scan_blocks) are fused block by block.
    """
    if isinstance(params, dict) or hasattr(params, "items"):
        if set(params.keys()) == _REP_FFN_KEYS:
            return _fuse_one_ffn(params)
        return {k: jax.vmap(fuse_ffn_params)(v) if k in STAGES else fuse_ffn_params(v)
                for k, v in params.items()}
    return params


# ----------------------------------------------------------------------------- scanned stages
def stack_blocks(params, depth: Sequence[int]) -> dict:
    """Params of the scan_blocks=True model from those of the unrolled one (same values).

    {"<stage>_<j>": tree, ...} -> {"<stage>": tree with leaves stacked on a new axis 0}.
    """
    out = dict(params)
    for stage, n in zip(STAGES, depth):
        blocks = [out.pop(f"{stage}_{j}") for j in range(n)]
        if blocks:
            out[stage] = jax.tree.map(
                lambda *xs: (np.stack if isinstance(xs[0], np.ndarray) else jnp.stack)(xs), *blocks)
    return out


def unstack_blocks(params, depth: Sequence[int]) -> dict:
    """Inverse of stack_blocks: scanned params -> params of the unrolled model."""
    out = dict(params)
    for stage, n in zip(STAGES, depth):
        if n:
            stacked = out.pop(stage)
            out.update({f"{stage}_{j}": jax.tree.map(lambda x: x[j], stacked) for j in range(n)})
    return out


def relayout_blocks(tree, depth: Sequence[int], scanned: bool):
    """`tree` with every U-DiT params dict in it (params, EMA, each Adam moment) in the
    scanned (stack_blocks) or unrolled (unstack_blocks) layout; other leaves as they are.

    For a train state written with the other model.scan_blocks: the same values, re-laid.
    A tree already in the wanted layout is returned as it is.
    """
    stages = [i for i, n in enumerate(depth) if n]
    if not stages:
        return tree
    source_key = f"{STAGES[stages[0]]}_0" if scanned else STAGES[stages[0]]
    convert = stack_blocks if scanned else unstack_blocks

    def is_params(x) -> bool:
        return isinstance(x, Mapping) and source_key in x

    return jax.tree.map(lambda x: convert(x, depth) if is_params(x) else x, tree,
                        is_leaf=is_params)
