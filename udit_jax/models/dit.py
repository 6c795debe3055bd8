"""DiT: the diffusion transformer of Peebles & Xie (arXiv 2212.09748), NHWC.

A port of the official `models.py` (facebookresearch/DiT). For an input [B, S, S, C] and
patch size p, with G = S / p, T = G * G tokens and width D:

    patchify (p x p stride-p conv) + fixed 2-D sin-cos pos_embed    -> [B, T, D]
    c = t_embedder(t) + y_embedder(y)                                -> [B, D]
    depth x block(x, conditioning)                                   -> [B, T, D]
    final layer (norm, modulate with c unless non-adaptive, linear)  -> [B, T, p*p*C_out]
    unpatchify                                                       -> [B, S, S, C_out]

`block_type` selects the conditioning designs the paper compares (Sec. 3.2, Fig. 3 and 5):
  'adaln_zero'  adaLN-Zero (the released models): regress shift/scale/gate from c; the
                modulation Linear is zero-initialised, so every block starts as the identity.
  'adaln'       adaptive LayerNorm without gates: regress shift/scale only.
  'cross_attn'  standard pre-LN ViT block plus cross-attention from the image tokens to the
                two-token sequence [t_emb, y_emb], placed after self-attention.
  'in_context'  standard pre-LN ViT blocks; t_emb and y_emb are appended to the token
                sequence as two extra tokens and removed after the last block.
Only adaLN-Zero has official weights. The non-adaptive variants use LayerNorm with learned
affine parameters (as standard ViT blocks do) and a plain LayerNorm before the final
linear (the paper: "adaptive if using adaLN"). In every variant the final linear is
zero-initialised, so the output at initialisation is zero, as in the official code.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from udit_jax.models import layers
from udit_jax.models.layers import dense, layer_norm, modulate

Dtype = Any

BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attn", "in_context")
ATTENTION_IMPLS = (None, "cudnn")
NUM_COND_TOKENS = 2  # [t_emb, y_emb] for 'cross_attn' and 'in_context'

# xavier_uniform on the conv kernel viewed as a (D, C*p*p) matrix, as the official init does
# for the patch embedding (fan_in = C*p*p, fan_out = D; a conv's own fans would be p*p larger).
patch_embed_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                    in_axis=(0, 1, 2), out_axis=-1)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table of the official DiT (the MAE recipe): [T, D] float32.

    Token n = i * grid_size + j sits at row i, column j. Channels [0, D/2) encode the column
    j and [D/2, D) the row i; each half is [sin(pos * w_k), cos(pos * w_k)] with
    w_k = 10000^(-k / (D/4)), k < D/4. Computed in float64 and rounded to float32 once, so
    it equals the official table bit for bit. Needs D divisible by 4.
    """
    if hidden_size % 4:
        raise ValueError(f"the 2-D sin-cos pos_embed needs hidden_size divisible by 4, got {hidden_size}")
    quarter = hidden_size // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
    coords = np.arange(grid_size, dtype=np.float32).astype(np.float64)

    def encode(pos: np.ndarray) -> np.ndarray:  # [T] -> [T, D/2]
        angles = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows = np.repeat(coords, grid_size)  # i for token n
    cols = np.tile(coords, grid_size)    # j for token n
    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------ sub-layers
class PatchEmbed(nn.Module):
    """p x p stride-p conv (with bias), tokens row-major. x: [B, S, S, C] -> [B, (S/p)^2, D]."""

    hidden_size: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.conv(self.hidden_size, self.patch_size, (None, "embed"), name="proj",
                        dtype=self.dtype, stride=self.patch_size, padding="VALID",
                        kernel_init=patch_embed_init)(x)
        b, gh, gw, d = h.shape
        return h.reshape(b, gh * gw, d)


class Attention(nn.Module):
    """Multi-head self-attention as timm's `Attention(qkv_bias=True)`. x: [B, N, D] -> [B, N, D].

    The qkv output channel s*D + h*hd + k holds (q|k|v)[s], head h, channel k.
    """

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.num_heads
        q, k, v = QKVProjection(d, self.num_heads, self.dtype, name="qkv")(x)
        o = layers.attention(q, k, v, scale=hd ** -0.5, implementation=self.attention_impl)
        return dense(d, ("mlp", "embed"), name="proj", dtype=self.dtype)(o.reshape(b, n, d))


class QKVProjection(nn.Module):
    """timm's fused qkv Linear (params 'kernel' [D_in, 3D], 'bias' [3D], named and initialised
    as `dense(3 * D, ("embed", "mlp"))`), split into heads:
    x [..., N, D_in] -> (q, k, v), each [..., N, heads, D / heads].

    Computed by `layers.qkv_projection` (three matmuls on TPUs, projected tokens-minor on
    v5p). The params are `layers.fused_qkv_params`.
    """

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        kernel, bias = layers.fused_qkv_params(self, x.shape[-1], self.dim)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        return layers.qkv_projection(x, kernel, bias, self.heads)


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x to a context sequence.

    x: [B, N, D], context: [B, M, D] -> [B, N, D]. Keys 'q', 'kv' (k then v), 'proj'.
    """

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, n, d = x.shape
        m = context.shape[1]
        hd = d // self.num_heads
        q = dense(d, ("embed", "mlp"), name="q", dtype=self.dtype)(x).reshape(b, n, self.num_heads, hd)
        kv = dense(2 * d, ("embed", "mlp"), name="kv", dtype=self.dtype)(context)
        k, v = jnp.unstack(kv.reshape(b, m, 2, self.num_heads, hd), axis=2)
        o = layers.attention(q, k, v, scale=hd ** -0.5, implementation=self.attention_impl)
        return dense(d, ("mlp", "embed"), name="proj", dtype=self.dtype)(o.reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> tanh-approximate GELU -> fc2 (timm `Mlp` as DiT builds it). [B, N, D] -> [B, N, D]."""

    hidden_size: int
    mlp_hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.mlp_hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        h = layers.gelu_tanh(h)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


def affine_layer_norm(x: jax.Array, name: str) -> jax.Array:
    """LayerNorm with learned scale/bias (eps 1e-6), computed in float32, returned in x.dtype.

    Call inside a compact method: the nn.LayerNorm named `name` belongs to the caller.
    """
    norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False,
                        scale_init=layers.with_axes(nn.initializers.ones, ("embed",)),
                        bias_init=layers.with_axes(nn.initializers.zeros, ("embed",)), name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


# ---------------------------------------------------------------------------------- blocks
class AdaLNBlock(nn.Module):
    """DiT block conditioned by adaptive LayerNorm; `gated=True` is adaLN-Zero (the official block).

    x: [B, T, D], c: [B, D] -> [B, T, D]. adaLN_modulation = SiLU -> Linear(D, 6D) (gated,
    chunks shift/scale/gate for attention then MLP) or Linear(D, 4D) (shift/scale only).
    It is zero-initialised, as the official init zeroes every block's adaLN Linear.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    gated: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d = self.hidden_size
        chunks = 6 if self.gated else 4
        mod = dense(chunks * d, ("embed", "mlp"), name="adaLN_modulation", dtype=self.dtype,
                    kernel_init=layers.zeros)(nn.silu(c))
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        else:
            shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(mod, 4, axis=-1)
            gate_msa = gate_mlp = None
        h = Attention(d, self.num_heads, self.dtype, self.attention_impl, name="attn")(
            modulate(layer_norm(x), shift_msa, scale_msa))
        x = x + (h if gate_msa is None else gate_msa[:, None, :] * h)
        h = Mlp(d, int(d * self.mlp_ratio), self.dtype, name="mlp")(
            modulate(layer_norm(x), shift_mlp, scale_mlp))
        return x + (h if gate_mlp is None else gate_mlp[:, None, :] * h)


class ViTBlock(nn.Module):
    """Standard pre-LN ViT block (in-context conditioning). x: [B, N, D] -> [B, N, D]."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.hidden_size
        x = x + Attention(d, self.num_heads, self.dtype, self.attention_impl, name="attn")(
            affine_layer_norm(x, "norm1"))
        return x + Mlp(d, int(d * self.mlp_ratio), self.dtype, name="mlp")(
            affine_layer_norm(x, "norm2"))


class CrossAttnBlock(nn.Module):
    """Pre-LN ViT block with cross-attention after self-attention.

    x: [B, T, D], context: [B, M, D] (the conditioning tokens, not normalised) -> [B, T, D].
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        d = self.hidden_size
        x = x + Attention(d, self.num_heads, self.dtype, self.attention_impl, name="attn")(
            affine_layer_norm(x, "norm1"))
        x = x + CrossAttention(d, self.num_heads, self.dtype, self.attention_impl, name="cross_attn")(
            affine_layer_norm(x, "norm2"), context)
        return x + Mlp(d, int(d * self.mlp_ratio), self.dtype, name="mlp")(
            affine_layer_norm(x, "norm3"))


class FinalLayer(nn.Module):
    """Norm (adaptive: modulated by c), then Linear(D, p*p*C_out), zero-initialised.

    x: [B, T, D], c: [B, D] (unused when not adaptive) -> [B, T, p*p*C_out].
    """

    hidden_size: int
    patch_size: int
    out_channels: int
    adaptive: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array | None = None) -> jax.Array:
        if self.adaptive:
            mod = dense(2 * self.hidden_size, ("embed", "mlp"), name="adaLN_modulation",
                        dtype=self.dtype, kernel_init=layers.zeros)(nn.silu(c))
            shift, scale = jnp.split(mod, 2, axis=-1)
            x = modulate(layer_norm(x), shift, scale)
        else:
            x = affine_layer_norm(x, "norm_final")
        return dense(self.patch_size ** 2 * self.out_channels, ("embed", None), name="linear",
                     dtype=self.dtype, kernel_init=layers.zeros)(x)


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """[B, T, p*p*C] -> [B, G*p, G*p, C], token (h, w)'s vector laid out (p, q, c) as officially.

    Element (p_i, q_i, c) of token (h, w) lands at pixel (h*p + p_i, w*p + q_i), channel c.
    """
    b, t, _ = x.shape
    g = int(round(t ** 0.5))
    x = x.reshape(b, g, g, patch_size, patch_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * patch_size, g * patch_size, channels)


# ----------------------------------------------------------------------------------- model
class DiT(nn.Module):
    """Diffusion transformer; fields take the official constructor's argument names.

    Port options: `block_type` (see the module docstring), `dtype` (compute dtype; params are
    float32, norms and softmax run in float32, the output is float32), `remat` (recompute
    each block in the backward pass but what `layers.remat_policy(remat_keeps)` keeps),
    `attention_impl` (None: XLA with float32 softmax; 'cudnn': the fused GPU kernel),
    `cfg_channels` (output channels that forward_with_cfg guides: 3 as officially, None for
    all).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    block_type: str = "adaln_zero"
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_keeps: str = "outputs"
    attention_impl: str | None = None
    cfg_channels: int | None = 3
    # jax.default_matmul_precision for this model's matmuls (None: JAX's default; 'bfloat16':
    # JAX's default on TPUs and GPUs, one bfloat16 pass on CPUs, see layers.one_bf16_pass).
    matmul_precision: str | None = None

    # -------------------------------------------------------------------------- geometry
    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def pos_embed_table(self) -> np.ndarray:
        """The fixed pos_embed [T, D] (float32); the official state_dict holds it as [1, T, D]."""
        return sincos_pos_embed_2d(self.hidden_size, self.grid_size)

    # --------------------------------------------------------------------------- forward
    @nn.compact
    @layers.at_matmul_precision
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, S, S, C] (S = input_size, C = in_channels), t: [B] timesteps, y: [B] labels.

        Returns [B, S, S, out_channels] float32. With train=True labels are dropped with
        probability class_dropout_prob (RNG stream 'label_dropout').
        """
        self.validate()
        self._check_inputs(x, t, y)
        d, p = self.hidden_size, self.patch_size
        tokens = PatchEmbed(d, p, self.dtype, name="x_embedder")(x.astype(self.dtype))
        tokens = tokens + jnp.asarray(self.pos_embed_table(), self.dtype)[None]
        t_emb = layers.TimestepEmbedder(d, dtype=self.dtype, name="t_embedder")(t)
        y_emb = layers.LabelEmbedder(self.num_classes, d, self.class_dropout_prob,
                                     dtype=self.dtype, name="y_embedder")(y, train)
        c = t_emb + y_emb
        cond_tokens = jnp.stack([t_emb, y_emb], axis=1)  # [B, 2, D]

        block_cls = {"adaln_zero": AdaLNBlock, "adaln": AdaLNBlock,
                     "cross_attn": CrossAttnBlock, "in_context": ViTBlock}[self.block_type]
        adaptive = block_cls is AdaLNBlock
        kwargs = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      dtype=self.dtype, attention_impl=self.attention_impl)
        if adaptive:
            kwargs["gated"] = self.block_type == "adaln_zero"
        if self.remat:
            block_cls = nn.remat(block_cls, policy=layers.remat_policy(self.remat_keeps))

        h = tokens
        if self.block_type == "in_context":
            h = jnp.concatenate([h, cond_tokens], axis=1)
            block_args = ()
        elif self.block_type == "cross_attn":
            block_args = (cond_tokens,)
        else:
            block_args = (c,)
        for i in range(self.depth):
            h = block_cls(**kwargs, name=f"blocks_{i}")(layers.constrain_activations(h), *block_args)
        h = layers.constrain_activations(h)[:, :self.num_patches]  # in-context: drop the conditioning tokens

        out = FinalLayer(d, p, self.out_channels, adaptive=adaptive, dtype=self.dtype,
                         name="final_layer")(h, c if adaptive else None)
        return unpatchify(out, p, self.out_channels).astype(jnp.float32)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array,
                         cfg_scale: float | jax.Array) -> jax.Array:
        """Classifier-free guidance as the official forward_with_cfg.

        x: [2B, S, S, C] whose first half is used for both halves (the second is ignored),
        t: [2B], y: [2B] (conditional labels then the null class num_classes). Returns
        [2B, S, S, C_out]: channels [0, cfg_channels) of both halves are
        uncond + cfg_scale * (cond - uncond); the rest are the raw outputs of their own half.
        """
        layers.require_null_class(self.class_dropout_prob)
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch ([cond; uncond] halves), "
                             f"got x of batch {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        return layers.guided_output(out, cfg_scale, self.cfg_channels)

    def _check_inputs(self, x, t, y) -> None:
        s, c = self.input_size, self.in_channels
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape [B, {s}, {s}, {c}] (NHWC), got {tuple(x.shape)}")
        if tuple(x.shape[1:]) != (s, s, c):
            hint = ""
            if tuple(x.shape[1:3]) == (c, s) and x.shape[3] == s:
                hint = " It looks NCHW: transpose with x.transpose(0, 2, 3, 1)."
            elif x.shape[3] != c:
                hint = f" The model takes {c} input channels (in_channels={c})."
            else:
                hint = (f" The model was built for input_size={s}; build it with "
                        f"input_size={x.shape[1]} for {x.shape[1]}x{x.shape[2]} inputs (square only).")
            raise ValueError(f"DiT expects x of shape [B, {s}, {s}, {c}] (NHWC), got {tuple(x.shape)}.{hint}")
        b = x.shape[0]
        for name, arr in (("t", t), ("y", y)):
            if tuple(jnp.shape(arr)) != (b,):
                raise ValueError(f"DiT expects {name} of shape [{b}] (one per example), got {tuple(jnp.shape(arr))}")

    # ------------------------------------------------------------------ model protocol
    def validate(self) -> None:
        """Raises ValueError naming the problem for a configuration that cannot be built."""
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DiT: {name} must be a positive integer, got {v!r}")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                     "num_heads", "num_classes"):
            positive_int(name)
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT: input_size={self.input_size} is not divisible by "
                             f"patch_size={self.patch_size}; pick a patch size that divides it")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiT: hidden_size={self.hidden_size} must be divisible by 4 for the "
                             "2-D sin-cos pos_embed (a quarter of the channels per sin/cos and axis)")
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"DiT: unknown block_type {self.block_type!r}; use one of {BLOCK_TYPES}")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"DiT: mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"DiT: class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"DiT: attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.cfg_channels is not None and (not isinstance(self.cfg_channels, (int, np.integer))
                                              or self.cfg_channels < 1):
            raise ValueError(f"DiT: cfg_channels must be a positive integer or None (all channels), "
                             f"got {self.cfg_channels!r}")

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x [B, S, S, C] float32, t [B] int32, y [B] int32) of zeros, for init."""
        s = self.input_size
        return (jnp.zeros((batch, s, s, self.in_channels), jnp.float32),
                jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

    def fixed_param_count(self) -> int:
        """pos_embed: in the official state_dict (and its parameter counts) but not a Flax param."""
        return self.num_patches * self.hidden_size

    def inference_form(self) -> "DiT":
        return self

    def count_macs(self) -> int:
        """Forward multiply-accumulates for one example, as the DiT paper counts "Gflops".

        torchprofile's rules on the (official) graph: Linear/matmul/conv MACs, attention as
        two matmuls, affine LayerNorms one MAC per element (non-affine ones and softmax,
        GELU, SiLU, adds: zero), the unpatchify einsum one per output element, elementwise
        multiplies one per output element. The one departure: the adaLN-Zero gate products
        (gate * branch) are not counted. With them, torchprofile on the official PyTorch
        model gives 2*T*D*depth more (DiT-XL/2: 118.655 instead of 118.638); without them
        all 12 configs of the paper's Table 4 and XL/2 at 512 (524.6) are reproduced within
        0.007 GFLOPs, and the Fig. 5 variants (adaLN 118.6, in-context 119.4, cross-attention
        137.6) to the figure's precision.
        """
        d, p, depth = self.hidden_size, self.patch_size, self.depth
        t = self.num_patches
        mlp = int(d * self.mlp_ratio)
        c_in, c_out = self.in_channels, self.out_channels
        freq = 256  # TimestepEmbedder.frequency_embedding_size

        def self_attention(n):  # qkv, q@k^T, attn@v, proj
            return n * d * 3 * d + 2 * n * n * d + n * d * d

        macs = t * d * c_in * p * p                  # patch-embed conv
        macs += freq                                  # two [freq/2] multiplies in the sinusoid
        macs += freq * d + d * d                      # timestep MLP (label table: a gather)
        if self.block_type in ("adaln_zero", "adaln"):
            chunks = 6 if self.block_type == "adaln_zero" else 4
            block = d * chunks * d + 2 * t * d        # adaLN Linear; x * (1 + scale) twice
            block += self_attention(t) + 2 * t * d * mlp
        elif self.block_type == "in_context":
            n = t + NUM_COND_TOKENS
            block = 2 * n * d + self_attention(n) + 2 * n * d * mlp
        else:  # cross_attn
            m = NUM_COND_TOKENS
            cross = t * d * d + m * d * 2 * d + 2 * t * m * d + t * d * d
            block = 3 * t * d + self_attention(t) + cross + 2 * t * d * mlp
        macs += depth * block
        if self.block_type in ("adaln_zero", "adaln"):
            macs += d * 2 * d + t * d                 # final adaLN Linear and modulate multiply
        else:
            macs += t * d                             # final affine LayerNorm
        macs += t * d * p * p * c_out                 # final Linear
        macs += t * p * p * c_out                     # unpatchify einsum
        return macs
