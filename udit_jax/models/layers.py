"""Building blocks shared by DiT and U-DiT: embedders, modulation, norms, attention core.

Every parameter carries logical axis names (see `udit_jax.parallel` for the rules that map
them to mesh axes). The vocabulary used here:
  'embed'   the residual width of a stage (or an input channel count)
  'mlp'     an expanded width (FFN hidden, qkv, adaLN outputs)
  'heads'   one value per attention head
  'vocab'   label-table rows
  'freq'    sinusoidal-feature inputs
  'conv_h', 'conv_w'   convolution kernel taps (never sharded)
Parameters are float32; `dtype` is the compute dtype. Norms, softmax and L2-normalisation
run in float32 whatever `dtype` is; RoPE (models/udit.py apply_rope) in `dtype`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
import flax.linen as nn

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()  # == torch xavier_uniform_ on (out, in[, kh, kw])
zeros = nn.initializers.zeros
normal_002 = nn.initializers.normal(stddev=0.02)


def with_axes(init: Callable, axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: tuple[str | None, str | None], *, name: str, dtype: Dtype,
          kernel_init: Callable = xavier_uniform, bias_init: Callable = zeros,
          use_bias: bool = True) -> nn.Dense:
    """nn.Dense with kernel [in, out] annotated `axes` and bias annotated `axes[1]`; its
    contraction is `matmul`."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    dot_general=_dense_dot_general, kernel_init=with_axes(kernel_init, axes),
                    bias_init=with_axes(bias_init, (axes[1],)), name=name)


def fused_qkv_params(module: nn.Module, d_in: int, d: int) -> tuple[jax.Array, jax.Array]:
    """The params of a fused q|k|v Linear, as `dense(3 * d, ("embed", "mlp"))` names and
    initialises them: 'kernel' [d_in, 3d], 'bias' [3d], float32. For modules that compute
    the projection themselves (nn.Dense computes its one output itself).

    The bias comes back whole on each chip: its callers slice it into q|k|v or reorder its
    columns, and FSDP splits [3d] across those boundaries, so done on the split bias the
    partitioner moved its pieces between chips."""
    kernel = module.param("kernel", with_axes(xavier_uniform, ("embed", "mlp")), (d_in, 3 * d),
                          jnp.float32)
    bias = module.param("bias", with_axes(zeros, ("mlp",)), (3 * d,), jnp.float32)
    return kernel, nn.with_logical_constraint(bias, (None,))


def qkv_projection(x: jax.Array, kernel: jax.Array, bias: jax.Array, heads: int | None = None):
    """x [..., N, D_in] @ kernel [D_in, 3D] + bias [3D] -> (q, k, v), each [..., N, D], or
    [..., N, heads, D / heads] with `heads`.

    Its forms, chosen by XLA's cost model on whole train steps (U-DiT-L's calls it without
    heads, DiT-XL/2's with):
    - TPUs: three matmuls (column blocks of kernel and bias). XLA:TPU copied one matmul's
      [..., 3D] output whole into attention's layout, and its split and the backward's stack
      were copies too: DiT-XL/2 52.3 -> 53.1% MFU, U-DiT-L 273.9 -> 268.1 ms (FSDP 254.4 ->
      248.8 ms, v5e-8 remat 547.8 -> 533.6 ms).
    - v6e without heads: one matmul (U-DiT-L three: 171.3 -> 173.5 ms); with heads three
      (DiT-XL/2 one: 96.2 -> 100.2 ms).
    - v5p with heads: each of the three projected tokens-minor (`qkv_tokens_minor`), the layout
      attention reads them in; XLA had copied the three outputs into it (DiT-XL/2 165.3 ->
      162.6 ms, 60.0 -> 61.0%). On v5e that form was slower (353 -> 364 ms), on v6e equal.
    - Elsewhere one matmul, split (GPUs unmeasured)."""
    if heads is None:
        return per_platform(x, kernel, bias, tpu=qkv_three_matmuls, tpu_v6e=qkv_one_matmul,
                            default=qkv_one_matmul)

    def split_heads(form):
        return lambda *a: tuple(t.reshape(*t.shape[:-1], heads, -1) for t in form(*a))

    return per_platform(x, kernel, bias, tpu=split_heads(qkv_three_matmuls),
                        tpu_v5p=functools.partial(qkv_tokens_minor, heads=heads),
                        default=split_heads(qkv_one_matmul))


def qkv_one_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array):
    """x [..., D_in] @ kernel [D_in, 3D] + bias, split into (q, k, v) [..., D]."""
    return tuple(jnp.split(matmul(x, kernel) + bias, 3, axis=-1))


def qkv_three_matmuls(x: jax.Array, kernel: jax.Array, bias: jax.Array):
    """`qkv_one_matmul` as one matmul per output (column blocks of kernel and bias)."""
    d = kernel.shape[1] // 3
    cols = [slice(i * d, (i + 1) * d) for i in range(3)]
    return tuple(matmul(x, kernel[:, c]) + bias[c] for c in cols)


def qkv_tokens_minor(x: jax.Array, kernel: jax.Array, bias: jax.Array, heads: int):
    """`qkv_three_matmuls` split into heads, each output computed as [..., D, N] and split
    there into [..., heads, D / heads, N] before the tokens move back: x [..., N, D_in] ->
    (q, k, v) [..., N, heads, D / heads]. The same values; XLA:TPU lays the results out with
    the tokens minor, as attention's matmuls read them. (Moved back before the heads split,
    XLA undoes the transpose and copies as before.)"""
    d = kernel.shape[1] // 3

    def project(cols):
        y = jnp.einsum("...nc,ce->...en", x, kernel[:, cols]) + bias[cols, None]   # [..., D, N]
        return jnp.moveaxis(y.reshape(*y.shape[:-2], heads, d // heads, y.shape[-1]), -1, -3)

    return tuple(project(slice(i * d, (i + 1) * d)) for i in range(3))


def conv(features: int, kernel: int, axes: tuple[str | None, str | None], *, name: str | None,
         dtype: Dtype, stride: int = 1, padding: Any = "SAME",
         use_bias: bool = True, kernel_init: Callable = xavier_uniform,
         bias_init: Callable = zeros) -> nn.Module:
    """nn.Conv with an HWIO kernel annotated ('conv_h', 'conv_w', *axes).

    A 1x1 stride-1 conv is a `PointwiseConv`: the same params, computed as a matmul.
    """
    kernel_init, bias_init = conv_inits(axes, kernel_init, bias_init)
    if kernel == 1 and stride == 1:
        return PointwiseConv(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                             bias_init=bias_init, name=name)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init, bias_init=bias_init, name=name)


def conv_inits(axes: tuple[str | None, str | None], kernel_init: Callable = xavier_uniform,
               bias_init: Callable = zeros) -> tuple[Callable, Callable]:
    """`conv`'s initialisers with their logical axes: HWIO kernel ('conv_h', 'conv_w', *axes),
    bias (axes[1],)."""
    return (with_axes(kernel_init, ("conv_h", "conv_w") + tuple(axes)),
            with_axes(bias_init, (axes[1],)))


def pointwise(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype: Dtype) -> jax.Array:
    """A 1x1 conv as a matmul in `dtype`: x [..., in], kernel [1, 1, in, out], bias [out] or
    None -> [..., out]."""
    y = matmul(x.astype(dtype), kernel[0, 0].astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


# The platform whose forms `per_platform` traces and its chip's branch name (None: unknown),
# fixed by `forms_for`; (None, None): every platform's forms.
_FORMS: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "forms", default=(None, None))
# A device's platform -> the lax.platform_dependent branch names that serve it.
_BRANCHES_OF = {"cpu": ("cpu",), "tpu": ("tpu",), "gpu": ("cuda", "rocm"), "cuda": ("cuda",),
                "rocm": ("rocm",)}
# TPU generations by jax.Device.device_kind prefix (first match wins: "TPU v5 lite" before
# "TPU v5", which is v5p) -> the per_platform branch name of that chip.
_TPU_CHIPS = (("TPU v5 lite", "tpu_v5e"), ("TPU v5e", "tpu_v5e"), ("TPU v5p", "tpu_v5p"),
              ("TPU v5", "tpu_v5p"), ("TPU v6 lite", "tpu_v6e"), ("TPU v6e", "tpu_v6e"),
              ("TPU v4", "tpu_v4"))
CHIP_BRANCHES = tuple(dict.fromkeys(name for _, name in _TPU_CHIPS))


def chip_branch(device_kind: str | None) -> str | None:
    """The per_platform branch name of a TPU's device_kind ('TPU v5 lite' -> 'tpu_v5e');
    None for other devices and unknown TPUs."""
    return next((name for prefix, name in _TPU_CHIPS if (device_kind or "").startswith(prefix)),
                None)


@contextlib.contextmanager
def forms_for(platform: str | None, device_kind: str | None = None):
    """Within it, `per_platform` traces only `platform`'s form ('cpu', 'tpu', 'gpu', as
    jax.Device.platform names them; None: every form, chosen when lowering), and on a TPU
    whose `device_kind` (jax.Device.device_kind) is known, that chip's form where a layer
    has one.

    For programs that are differentiated: JAX's partial evaluation of lax.platform_dependent
    (a cond) gives the forward the residuals of every platform's form, the other platforms'
    filled with zeros, and under remat those zeros pass jax.checkpoint's optimization barrier,
    so XLA writes them to HBM and reads them back (by XLA's cost model, U-DiT-L's v5e-8 remat
    step 576 -> 548 ms; DiT-XL/2's v5e-8 FSDP remat step 10.2 -> 7.9 GiB per chip, 730 -> 693
    ms). The other forms also cost lowering and compile time (U-DiT-L's v5p-8 step: 487 ->
    357 s). The train step and the sampler trace under their mesh's devices. jax.jit's trace
    cache does not see this setting: trace a jitted function always inside it or always
    outside."""
    if platform is not None and platform not in _BRANCHES_OF:
        raise ValueError(f"forms_for({platform!r}): use one of {sorted(_BRANCHES_OF)} or None")
    token = _FORMS.set((platform, chip_branch(device_kind) if platform == "tpu" else None))
    try:
        yield
    finally:
        _FORMS.reset(token)


def per_platform(*args, default: Callable, **branches: Callable):
    """lax.platform_dependent(*args, default=..., cpu=/tpu=/cuda=/rocm=...), or, inside
    `forms_for(platform)`, that platform's branch (else `default`) called directly: the one
    way the models pick a form per platform.

    A TPU chip's own form (`tpu_v5p=`, `tpu_v5e=`, `tpu_v6e=`, `tpu_v4=`; XLA:TPU's best
    layout differs between generations) is taken only inside `forms_for` with that chip's
    device_kind; elsewhere a TPU takes `tpu=` (else `default`)."""
    unknown = set(branches) - set(CHIP_BRANCHES) - {b for bs in _BRANCHES_OF.values() for b in bs}
    if unknown:
        raise ValueError(f"per_platform: unknown branches {sorted(unknown)}; use platform names "
                         f"{sorted(_BRANCHES_OF)} or TPU chips {list(CHIP_BRANCHES)}")
    platform, chip = _FORMS.get()
    if platform is None:
        return jax.lax.platform_dependent(
            *args, default=default, **{b: f for b, f in branches.items() if b not in CHIP_BRANCHES})
    names = ((chip,) if chip else ()) + _BRANCHES_OF[platform]
    chosen = next((branches[b] for b in names if b in branches), default)
    return chosen(*args)


def _contract_last(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


# jax.default_matmul_precision values that ask for one bfloat16 pass per matmul.
ONE_BF16_PASS = ("bfloat16", "default", "fastest")
# A model's `matmul_precision`: JAX's default (None) or one of JAX's named precisions.
MATMUL_PRECISIONS = (None, "bfloat16", "tensorfloat32", "float32")


def one_bf16_pass() -> bool:
    """Whether JAX's default matmul precision (jax.default_matmul_precision; the models'
    `matmul_precision`) is Precision.DEFAULT, which TPUs run as one bfloat16 pass per matmul.

    TPUs and GPUs (TF32) apply the precision in XLA; XLA:CPU ignores it and multiplies float32
    in float32. The CPU forms here then do as TPUs (`mm_operand`): XLA:CPU's matmul library
    multiplies bfloat16 operands into a float32 result on the CPU's bfloat16 units (AMX,
    AVX512-BF16), 5x its float32 rate on a 2-core Sapphire Rapids VM (1.5 against 0.29
    TFLOP/s). Read when a forward is traced; its backward follows the forward's choice.
    """
    return str(jax.config.jax_default_matmul_precision).lower() in ONE_BF16_PASS


def at_matmul_precision(method: Callable) -> Callable:
    """A model method run under jax.default_matmul_precision(self.matmul_precision) (JAX's
    default when None): the model's matmuls, its CPU forms' included, at the model's own
    precision, whatever else the program computes (Inception, classifiers) at theirs."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        precision = self.matmul_precision
        with (jax.default_matmul_precision(precision) if precision is not None
              else contextlib.nullcontext()):
            return method(self, *args, **kwargs)
    return run


def mm_operand(x: jax.Array, bf16: bool) -> jax.Array:
    """x as an operand of a CPU form's matmul: float32 rounded to bfloat16 when `bf16` (the
    forward's `one_bf16_pass()`), otherwise unchanged. The matmul accumulates in float32."""
    return x.astype(jnp.bfloat16) if bf16 and x.dtype == jnp.float32 else x


def _dot_f32(x: jax.Array, w: jax.Array, dims, bf16: bool) -> jax.Array:
    """lax.dot_general of two `mm_operand`s, accumulated and returned in float32."""
    return jax.lax.dot_general(mm_operand(x, bf16), mm_operand(w, bf16), dims,
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_own_vjp(x: jax.Array, w: jax.Array, bf16: bool) -> jax.Array:
    return _matmul_fwd(x, w, bf16)[0]


def _matmul_fwd(x, w, bf16):
    x_mm, w_mm = mm_operand(x, bf16), mm_operand(w, bf16)    # rounded once, kept for the backward
    y = _dot_f32(x_mm, w_mm, (((x.ndim - 1,), (0,)), ((), ())), bf16).astype(x.dtype)
    return y, (x_mm, w_mm)


def _matmul_bwd(bf16, residuals, g):
    x, w = residuals          # as the forward multiplied them
    grad_x = _dot_f32(g, w, (((g.ndim - 1,), (1,)), ((), ())), bf16)
    # The weight gradient as (g^T x)^T: the gradient streams through the dot in its own
    # layout and only the small [out, in] product is transposed.
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_w = _dot_f32(g2, x2, (((0,), (0,)), ((), ())), bf16).T
    # `matmul`'s callers give x and w one dtype, the output's, which is g's.
    return grad_x.astype(g.dtype), grad_w.astype(g.dtype)


_matmul_own_vjp.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out], the contraction of every dense and 1x1 layer;
    x and w of one dtype.

    On CPUs with its own VJP, at JAX's matmul precision (`one_bf16_pass`). Under autodiff,
    XLA:CPU transposes the incoming gradient for each weight gradient and fuses the residual
    stream's whole elementwise backward (norms, modulation, gates of every later block) into
    that transposing copy, recomputing it once per weight: 0.76 s of U-DiT-S's 4 s train step
    at batch 4. The VJP below gives the weight gradient as (g^T x)^T, which leaves the
    gradient in place. Other platforms keep autodiff's form (their programs and cost estimates
    are unchanged).
    """
    bf16 = one_bf16_pass()
    return per_platform(x, w, cpu=lambda x, w: _matmul_own_vjp(x, w, bf16), default=_contract_last)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's contraction (the last axis of the input with the kernel's first) as `matmul`;
    any other contraction, precision or output type goes to lax unchanged."""
    if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None
            or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return matmul(lhs, rhs)


class PointwiseConv(nn.Module):
    """A 1x1 convolution with nn.Conv's params (kernel [1, 1, in, out], bias [out]), run as a
    matmul over the channel axis: x [..., in] -> [..., out].

    Equal to nn.Conv with kernel (1, 1). XLA lowers the convolution's weight gradient with
    layout transposes of the whole activation on each side (most of a small U-DiT's CPU step
    went there); `matmul` contracts the minor axis in place.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = xavier_uniform
    bias_init: Callable = zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        return pointwise(x, kernel, bias, self.dtype)


# Logical names of the main activations' axes, by rank (tokens [B, T, D]; NHWC maps). Under
# flax logical-axis rules (parallel.activation_rules) they become sharding constraints;
# without rules they are no-ops.
ACTIVATION_AXES = {3: ("activation_batch", "activation_length", "activation_embed"),
                   4: ("activation_batch", "activation_height", "activation_width", "activation_embed")}


def batch_shards() -> int:
    """How many ways the activations' batch axis is split: the size of the mesh axes that the
    current flax logical-axis rules map "activation_batch" to, in the current mesh (the train
    step traces under both); 1 outside them."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = dict(nn.get_logical_axis_rules()).get("activation_batch")
    if mesh.empty or not axes:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def constrain_activations(x: jax.Array) -> jax.Array:
    """x with its logical activation axes declared (a block's input or output)."""
    return nn.with_logical_constraint(x, ACTIVATION_AXES[x.ndim])


def _grouped(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """lax's depthwise (feature-grouped) 'SAME' convolution, NHWC / HWIO."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 'SAME' convolution, x: [B, H, W, C], kernel: [k, k, 1, C] -> [B, H, W, C].

    Per platform (`per_platform`, so a TPU program compiled on a CPU host gets
    the TPU form): `depthwise_taps` on CPUs and TPUs, lax's grouped convolution on GPUs
    (cuDNN's depthwise kernels). On a TPU, at U-DiT-L's FFN (768 channels, 32x32, 16 images,
    bf16, v5p), XLA's cost model gives the taps forward 0.07 ms against 0.14 ms for the
    grouped convolution and the whole FFN 0.52 ms against 0.62 ms, and the FFN compiles in
    14 s against 21 s (benchmarks/bench_compile_parts.py).
    """
    kernel = kernel.astype(x.dtype)
    return per_platform(x, kernel, cuda=_grouped, rocm=_grouped, default=depthwise_taps)


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' depthwise correlation as k*k shifted, per-channel scaled copies of x (see below)."""
    k = kernel.shape[0]
    r = k // 2
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    kernel = kernel.astype(x.dtype)
    out = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _taps_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """d(sum(g * taps(x, K))) / dK: [k, k, 1, C], summed in float32.

    K[i, j, c] collects sum_{b,h,w} xpad[b, h+i, w+j, c] * g[b, h, w, c]. XLA's CPU backend
    emits reductions that keep the channels (over B, H and W here) as scalar loops, but
    vectorises elementwise multiply-adds over W and C. So a scan over the k*k taps runs an
    inner scan over the output rows h that adds the tap's shifted row of x times g's row to
    one accumulator [B, W, C] (four rows per iteration), and each tap's accumulator is summed
    over W once. One small fusion in the loop body keeps the compile as short as before; k*k
    accumulators in one row loop ran no faster in the step and compiled 30% longer. Against
    the channels-major scan of tap reductions before it (2-core Xeon, U-DiT-S, batch 4, one
    CPU device), the step's 88 kernel gradients take 146-170 ms instead of 392-417 alone,
    and the train step 1.57-1.69 s instead of 1.82-1.84 s. Images stay apart until the end:
    with the batch sharded over devices, each device sums its own images and one all-reduce
    adds them.
    """
    b, h, w, c = x.shape
    r = k // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))   # [B, H+2r, W+2r, C]

    def tap(_, ij):
        i, j = ij // k, ij % k

        def row(acc, y):
            xr = jax.lax.dynamic_slice(xp, (0, y + i, j, 0), (b, 1, w, c))[:, 0]   # [B, W, C]
            return acc + xr.astype(jnp.float32) * g[:, y].astype(jnp.float32), None

        acc, _ = jax.lax.scan(row, jnp.zeros((b, w, c), jnp.float32), jnp.arange(h), unroll=4)
        return None, acc.sum(1)   # [B, C]

    per_image = jax.lax.scan(tap, None, jnp.arange(k * k))[1]   # [k*k, B, C]
    return per_image.sum(1).reshape(k, k, 1, c)


@jax.custom_vjp
def depthwise_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 'SAME' convolution as a sum of shifted, per-channel scaled copies of x.

    x: [B, H, W, C], kernel: [k, k, 1, C] (k odd; flax's grouped-conv HWIO layout) -> [B, H, W, C].
    Equal to lax.conv with feature_group_count=C, but XLA's CPU backend runs grouped
    convolutions (and their gradients) as slow generic loops; k*k fused multiply-adds
    vectorise over C. The gradient is written by hand: w.r.t. x it is the same sum with the
    kernel flipped, w.r.t. the kernel a scan of multiply-adds on CPUs (`_taps_kernel_grad`)
    and the grouped convolution's kernel gradient elsewhere (`_grouped_kernel_grad`); left
    to autodiff, the backward pass keeps all k*k shifted copies of x, which on a CPU cost
    more than the rest of a U-DiT block.
    """
    return _shifted_sum(x, kernel)


def _depthwise_taps_fwd(x, kernel):
    return _shifted_sum(x, kernel), (x, kernel)


def _grouped_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """d(sum(g * taps(x, K))) / dK as lax's grouped-convolution kernel gradient, in float32.

    The TPU form: the cost model prices it at half the k*k shifted reductions (0.21 ms vs
    0.41 ms at 768 channels, 32x32, 16 images)."""
    zeros = jnp.zeros((k, k, 1, x.shape[-1]), x.dtype)
    return jax.vjp(lambda kernel: _grouped(x, kernel), zeros)[1](g)[0].astype(jnp.float32)


def _depthwise_taps_bwd(residuals, g):
    x, kernel = residuals
    k = kernel.shape[0]
    grad_x = _shifted_sum(g, kernel[::-1, ::-1])
    grad_kernel = per_platform(
        x, g.astype(x.dtype), cpu=lambda x, g: _taps_kernel_grad(x, g, k),
        default=lambda x, g: _grouped_kernel_grad(x, g, k))
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise k x k 'SAME' conv with nn.Conv's params (kernel [k, k, 1, C], bias [C]).

    x: [B, H, W, C] -> [B, H, W, C]; computed by `depthwise_conv`.
    """

    features: int
    kernel: int
    axes: tuple[str | None, str | None]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel, self.features
        # The init `conv` gives a grouped nn.Conv kernel (xavier over the HWIO shape).
        kernel = self.param("kernel", with_axes(xavier_uniform, ("conv_h", "conv_w") + tuple(self.axes)),
                            (k, k, 1, c), jnp.float32)
        bias = self.param("bias", with_axes(zeros, (self.axes[1],)), (c,), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel) + bias.astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch.nn.functional.gelu: x/2 (1 + erf(x / sqrt 2)), its formula (flax's nn.gelu
    defaults to the tanh form). jax.nn.gelu(approximate=False) writes it with erfc, which
    XLA:CPU expands into several passes (exp, divisions, branches): 2.5x slower than erf's
    polynomial on U-DiT-S's FFN activations; the two agree to float32 rounding."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def gelu_tanh(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=True)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift, with shift/scale [B, C] broadcast over x's middle axes.

    x: [B, ..., C] (tokens [B, N, C] or images [B, H, W, C]).
    """
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1 + scale[expand]) + shift[expand]


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features [cos | sin] of timesteps, as DiT computes them (float32).

    t: [B] (int or float) -> [B, dim].
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> Linear -> SiLU -> Linear. t: [B] -> [B, hidden]."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        freq = timestep_embedding(t, self.frequency_embedding_size).astype(self.dtype)
        h = dense(self.hidden_size, ("freq", "embed"), name="mlp_0", dtype=self.dtype,
                  kernel_init=normal_002)(freq)
        h = nn.silu(h)
        return dense(self.hidden_size, ("embed", "mlp"), name="mlp_2", dtype=self.dtype,
                     kernel_init=normal_002)(h)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with classifier-free-guidance label dropout.

    The table has num_classes + 1 rows when dropout_prob > 0; row `num_classes` is the null
    (unconditional) class. Labels are dropped only with `train=True`, drawing the mask from
    the 'label_dropout' RNG stream (each embedder instance gets its own draw).
    """

    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, train: bool = False,
                 force_drop_ids: jax.Array | None = None) -> jax.Array:
        use_cfg_embedding = int(self.dropout_prob > 0)
        table = self.param("embedding_table", with_axes(normal_002, ("vocab", "embed")),
                           (self.num_classes + use_cfg_embedding, self.hidden_size),
                           jnp.float32)
        if force_drop_ids is not None:
            labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("label_dropout"), labels.shape) < self.dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0).astype(self.dtype)


def require_null_class(class_dropout_prob: float) -> None:
    """Classifier-free guidance needs the null-class row, which exists only with label dropout."""
    if not class_dropout_prob > 0:
        raise ValueError("forward_with_cfg needs a null class, but this model was built with "
                         "class_dropout_prob=0 (no unconditional embedding); sample it with cfg_scale=1 "
                         "(plain forward) or train with label dropout")


def guided_output(out: jax.Array, cfg_scale: float | jax.Array, guided_channels: int | None) -> jax.Array:
    """Classifier-free guidance mix of a model output on [cond; uncond] halves.

    out: [2B, ..., C] from a batch whose first half is conditional and second half
    unconditional (same inputs). The first `guided_channels` channels (all when None) become
    uncond + s * (cond - uncond) in both halves; the rest pass through from their own half,
    as the official forward_with_cfg does (it guides channels 0-2 only).
    """
    n = out.shape[-1] if guided_channels is None else guided_channels
    eps, rest = out[..., :n], out[..., n:]
    cond, uncond = jnp.split(eps, 2, axis=0)
    half = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([half, half], axis=0), rest], axis=-1)


def _dots(q: jax.Array, k: jax.Array) -> jax.Array:
    """[B, N, heads, hd] x [B, M, heads, hd] -> float32 [B, heads, N, M], q.k per pair."""
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def _softmax_numerators(dots: jax.Array, scale: float) -> jax.Array:
    """exp(scale (dots - their row maximum)), float32 [..., N, M], for scale > 0: the
    softmax's weights of the logits scale * dots, times the row sums of this same array.
    (The scale applied after the maximum: applied to the q.k matmul's output, it stops XLA
    from fusing the row maximum and the exp into that matmul on TPUs.)"""
    return jnp.exp((dots - jnp.max(dots, axis=-1, keepdims=True)) * scale)


def _attention_recomputed_fwd(q, k, v, scale):
    e = _softmax_numerators(_dots(q, k), scale)
    sums = jnp.sum(e, axis=-1)                                           # [B, heads, N]
    # Normalised after the weighted sum (on [N, hd], not on [N, M]), and the row maximum
    # used only inside the exp: on TPUs XLA then computes the logits, their row maximum, the
    # exp and the sums in the q.k matmul's fusion and writes only the weights, in the compute
    # dtype (not the float32 logits, read again three times).
    o = jnp.einsum("bhqk,bkhd->bqhd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = (o / sums.transpose(0, 2, 1)[..., None]).astype(v.dtype)
    # Named for remat_policy: kept, the rematerialised forward skips the attention.
    o, sums = checkpoint_name(o, "attention_out"), checkpoint_name(sums, "attention_sums")
    return o, (q, k, v, o, sums)


def _attention_recomputed_bwd(scale, residuals, g):
    q, k, v, o, sums = residuals
    # A barrier, so that XLA recomputes the logits here instead of merging this q.k with the
    # forward's and keeping its float32 result alive until the backward.
    q, k = jax.lax.optimization_barrier((q, k))
    # The weights again (the same row maximum, recomputed in the fusion), in the compute
    # dtype: in bfloat16 they go through memory at half the bytes of float32 (the traffic
    # bounds this backward on TPUs), at the rounding (2^-9 relative) ds gets below anyway.
    p = (_softmax_numerators(_dots(q, k), scale) / sums[..., None]).astype(q.dtype)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(g.dtype), g)
    dp = jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=jnp.float32)
    # Softmax's backward: dlogits = p * (dp - sum_k p dp) and sum_k p dp = g . o.
    delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(jnp.float32), o.astype(jnp.float32))
    ds = (p.astype(jnp.float32) * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _mm_einsum(spec: str, a: jax.Array, b: jax.Array, bf16: bool) -> jax.Array:
    """einsum of two `mm_operand`s, accumulated and returned in float32."""
    return jnp.einsum(spec, mm_operand(a, bf16), mm_operand(b, bf16),
                      preferred_element_type=jnp.float32)


def _heads_major_fwd(q, k, v, scale, bf16):
    dtype = v.dtype
    q, k, v = (mm_operand(a, bf16) for a in (q, k, v))   # rounded once, kept for the backward
    logits = _mm_einsum("bhqd,bhkd->bhqk", q, k, bf16) * scale
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))        # unnormalised weights
    s = jnp.sum(e, axis=-1, keepdims=True)                              # [B, heads, N, 1]
    o = (_mm_einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, bf16) / s).astype(dtype)
    return o, (q, k, v, o, e, s)


def _heads_major_bwd(scale, bf16, residuals, g):
    q, k, v, o, e, s = residuals
    gs = g.astype(jnp.float32) / s                                      # folds 1/s into g
    # dv and dk as [.., hd, M] (transposed afterwards): XLA:CPU runs these forms in its matmul
    # library; contracting the weights' query axis into a [.., M, hd] output it does not.
    dv_t = _mm_einsum("bhqd,bhqk->bhdk", gs.astype(v.dtype), e.astype(v.dtype), bf16)
    dp = _mm_einsum("bhqd,bhkd->bhqk", gs.astype(v.dtype), v, bf16)
    delta = jnp.sum(gs * o.astype(jnp.float32), axis=-1, keepdims=True)   # sum_k p dp = g.o / s
    ds = (e * (dp - delta) * scale).astype(q.dtype)
    dq = _mm_einsum("bhqk,bhkd->bhqd", ds, k, bf16)
    dk_t = _mm_einsum("bhqd,bhqk->bhdk", q, ds, bf16)
    dtype = g.dtype        # the primal q, k, v's (the residuals may be rounded to bfloat16)
    return dq.astype(dtype), dk_t.swapaxes(-1, -2).astype(dtype), dv_t.swapaxes(-1, -2).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention_heads_major(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                          bf16: bool = False) -> jax.Array:
    """Softmax attention on heads-major arrays, the CPU form: [B, heads, N, hd] x
    [B, heads, M, hd] -> [B, heads, N, hd], float32 softmax, matmuls at JAX's matmul
    precision (`mm_operand`: bfloat16 operands when `bf16`); q, k, v of one dtype.

    The forward divides the [N, hd] output by the softmax's sums instead of the [N, M]
    weights by them, and keeps the unnormalised weights for the backward (a CPU's memory has
    room for them; recomputing them costs a matmul and an exp); the backward folds 1/sum
    into the incoming gradient. U-DiT-S's first-stage attention (16 x 4 heads, 256 tokens,
    hd 24) on a 2-core CPU: forward 4.7 ms against 8.5 ms for jax.nn.softmax's, forward and
    backward 31-32 ms against 36 ms.
    """
    return _heads_major_fwd(q, k, v, scale, bf16)[0]


attention_heads_major.defvjp(_heads_major_fwd, _heads_major_bwd)


# What a remat'd block keeps from its forward besides its input (model field `remat_keeps`).
REMAT_KEEPS = ("outputs", "attention", "inputs")


def remat_policy(keeps: str):
    """jax.checkpoint policy of a remat'd block; `keeps`:
      'outputs'    the outputs of matmuls without batch dimensions (dense and 1x1 layers) and
                   attention_recomputed's output and softmax sums: the backward recomputes
                   norms, activations, convolutions and q, k, v, no projection or attention;
      'attention'  only the attention's output and softmax sums;
      'inputs'     nothing: the whole block is recomputed (least memory).
    Less kept means less memory and a slower step; configs/udit_l.py and the README ("Before
    you rent a pod") give U-DiT-L's v5p-8 figures for each."""
    names = jax.checkpoint_policies.save_only_these_names("attention_out", "attention_sums")
    policies = {"outputs": jax.checkpoint_policies.save_from_both_policies(
                    jax.checkpoint_policies.dots_with_no_batch_dims_saveable, names),
                "attention": names,
                "inputs": jax.checkpoint_policies.nothing_saveable}
    if keeps not in policies:
        raise ValueError(f"remat_keeps={keeps!r}: use one of {REMAT_KEEPS}")
    return policies[keeps]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_recomputed(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention whose backward recomputes the weights from q, k and the float32
    softmax sums per query, as flash attention's does. [B, N, heads, hd] -> [B, N, heads, hd];
    scale > 0.

    Autodiff of the softmax keeps the float32 weights [B, heads, N, M] for the backward and
    moves them through memory several times; that traffic, not the matmuls, bounds the
    attention on TPUs. Here the forward writes the weights once, unnormalised and in the
    compute dtype, and the backward recomputes them once, in the compute dtype too. By XLA's
    cost model on v5p (bf16, forward and backward compiled apart, as remat runs them), the
    attention of U-DiT-L's first level (256 x 16 heads x 256 tokens x 24) takes 2.19 ms
    against 3.81 ms with float32 logits and a log-sum-exp, DiT-XL/2's (64 x 16 x 256 x 72)
    0.91 ms against 1.32 ms. The residuals are q, k, v, the output (which the next layer
    keeps anyway) and [B, heads, N] floats; the price is one more q.k matmul in the backward.
    """
    return _attention_recomputed_fwd(q, k, v, scale)[0]


attention_recomputed.defvjp(_attention_recomputed_fwd, _attention_recomputed_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None,
              implementation: str | None = None) -> jax.Array:
    """Softmax attention with float32 logits/softmax.

    q, k, v: [B, N, heads, hd] -> [B, N, heads, hd]. `implementation` is passed to
    jax.nn.dot_product_attention ('cudnn' for the fused GPU kernel, which computes in the
    input dtype with float32 accumulation); None or 'xla' uses an explicit float32 softmax,
    on CPUs `attention_heads_major` (on heads-major copies), elsewhere `attention_recomputed`.
    """
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bf16 = one_bf16_pass()

    def heads_major(q, k, v):
        # XLA's CPU backend runs the [B, N, heads, hd] contraction as a generic loop, 5x
        # slower at U-DiT's first-stage shapes than its matmul library on heads-major copies.
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        return attention_heads_major(q, k, v, scale, bf16).transpose(0, 2, 1, 3)

    def in_place(q, k, v):
        # TPU: the layout is XLA's to choose; explicit transposes cost copies (U-DiT-L's
        # attention at stage 1 on v5p: cost model 2.95 ms against 3.32 ms heads-major).
        return attention_recomputed(q, k, v, scale)

    return per_platform(q, k, v, cpu=heads_major, default=in_place)
