"""Where the TPU compiler spends its time on U-DiT: each part's forward + backward compiled
alone for a TPU chip on this host (needs the [tpu] extra; no TPU).

Every part is compiled as value_and_grad of sum(out^2) with respect to its params and input,
at one U-DiT stage's width, side and batch, on one chip of the topology. The table gives
compile wall / CPU seconds, XLA's FLOPs and the cost model's time for each part, so a part
whose compile time is out of proportion to its FLOPs stands out.

    python -m benchmarks.bench_compile_parts                          # U-DiT-L stage 1 widths
    python -m benchmarks.bench_compile_parts --width 768 --side 16 --heads 16 --batch 16
    python -m benchmarks.bench_compile_parts --parts block ffn_rep_taps ffn_rep_grouped

The model itself lowers its depthwise convolutions per platform (layers.depthwise_conv): the
`*_taps` parts show the shifted multiply-add form it used everywhere before, the `*_grouped`
parts the grouped convolution it now compiles for TPUs.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks.common import print_table
from udit_jax import compile as compile_lib
from udit_jax import hlo_cost, parallel
from udit_jax.models import layers, udit


class _Depthwise(nn.Module):
    """Depthwise 5x5 as `layers.depthwise_taps` (shifted multiply-adds; U-DiT's CPU form) or
    lax's grouped convolution (its form on other platforms), whatever the platform."""
    features: int
    dtype: jnp.dtype
    taps: bool

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.1), (5, 5, 1, self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.taps:
            return layers.depthwise_taps(x, kernel)
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=self.features)


class _FFN(nn.Module):
    """The rep FFN's training form (its three depthwise branches and identity merged into one
    5x5 kernel, as RepFeedForward) with the depthwise as taps or grouped convolution."""
    dim: int
    hidden: int
    dtype: jnp.dtype
    taps: bool

    @nn.compact
    def __call__(self, x):
        c = lambda n, name: layers.conv(n, 1, ("embed", "mlp"), name=name, dtype=self.dtype)  # noqa: E731
        a = layers.gelu_exact(c(self.hidden, "in1")(c(self.hidden // 2, "in0")(x)))
        a = _Depthwise(self.hidden, self.dtype, self.taps)(a)
        return c(self.dim, "out1")(c(self.hidden // 2, "out0")(a))


class _Shuffle(nn.Module):
    """The U-DiT down- and up-sampling: 3x3 conv + pixel unshuffle, then back."""
    dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = lambda n, name: layers.conv(n, 3, ("embed", "embed"), name=name, dtype=self.dtype)  # noqa: E731
        down = udit.pixel_unshuffle(c(self.dim // 2, "down")(x), 2)
        return udit.pixel_shuffle(c(2 * down.shape[-1], "up")(down), 2)


def parts(d: int, heads: int, mlp_ratio: float, dtype) -> dict[str, nn.Module | tuple]:
    """name -> module (input width d) or (module, its input width)."""
    hidden = udit.ffn_hidden(d, mlp_ratio)
    attn = dict(attn_type="v2", posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)
    block = lambda **kw: udit.UDiTBlock(d, heads, mlp_ratio, 2, "rep", 1, False,  # noqa: E731
                                        {**attn, **kw}, dtype)
    return {
        "block": block(),
        "attention": udit.DownsampledAttention(d, heads, 2, dtype=dtype, **attn),
        "attention_no_rope": udit.DownsampledAttention(d, heads, 2, dtype=dtype,
                                                       **{**attn, "posemb_type": None}),
        "attention_no_dwconv": udit.DownsampledAttention(d, heads, 2, dtype=dtype,
                                                         **{**attn, "downsampler": None}),
        "ffn_rep": udit.RepFeedForward(d, hidden, dtype),        # as the model runs it
        "ffn_rep_taps": _FFN(d, hidden, dtype, taps=True),
        "ffn_rep_grouped": _FFN(d, hidden, dtype, taps=False),
        "ffn_basic": udit.BasicMlp(d, hidden, dtype),
        "dwconv5_taps": (_Depthwise(hidden, dtype, taps=True), hidden),  # the FFN's hidden width
        "dwconv5_grouped": (_Depthwise(hidden, dtype, taps=False), hidden),
        "down_up_shuffle": _Shuffle(d, dtype),
    }


def compile_part(name: str, module, b: int, side: int, d: int, device) -> dict:
    module, width = module if isinstance(module, tuple) else (module, d)
    takes_c = isinstance(module, udit.UDiTBlock)
    x = jax.ShapeDtypeStruct((b, side, side, width), jnp.float32)
    c = jax.ShapeDtypeStruct((b, d), jnp.float32)
    args = (x, c) if takes_c else (x,)
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *(
        jnp.zeros(a.shape, a.dtype) for a in args))["params"]))

    def loss(p, *inputs):
        out = module.apply({"params": p}, *inputs)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    sharding = NamedSharding(Mesh(np.array([device]), ("d",)), P())
    put = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args) + 1))))
    t0, c0 = time.perf_counter(), time.process_time()
    with layers.forms_for(device.platform, device.device_kind):   # the chip's forms, as training
        lowered = fn.lower(jax.tree.map(put, params), *map(put, args))
    lower_s = time.perf_counter() - t0
    with parallel.without_compilation_cache():   # a compile, not a cache read
        compiled = lowered.compile()
    cost, text = hlo_cost.cost_analysis(compiled), compiled.as_text()
    seconds = hlo_cost.cost_model_seconds(cost.get("optimal_seconds"), text)
    return {"part": name, "lower s": lower_s, "compile s": time.perf_counter() - t0 - lower_s,
            "CPU-s": time.process_time() - c0, "XLA GFLOP": cost.get("flops", 0) / 1e9,
            "est ms": 1e3 * seconds if seconds else None,
            "HLO lines": len(text.splitlines())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="v5e-1")
    p.add_argument("--width", type=int, default=384, help="stage width (U-DiT-L stage 1: 384)")
    p.add_argument("--side", type=int, default=32, help="stage side (latent 32 at stage 1)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp_ratio", type=float, default=2)
    p.add_argument("--batch", type=int, default=16, help="images per chip")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--parts", nargs="+", help="a subset of the parts (default: all)")
    args = p.parse_args()
    device = compile_lib.topology_devices(compile_lib.parse_topology(args.topology))[0]
    table = parts(args.width, args.heads, args.mlp_ratio, jnp.dtype(args.dtype))
    rows = []
    for name in args.parts or table:
        rows.append(compile_part(name, table[name], args.batch, args.side, args.width, device))
        print_table(rows[-1:], "" if len(rows) > 1 else
                    f"U-DiT parts, forward + backward, on one {device.device_kind} "
                    f"(width {args.width}, side {args.side}, batch {args.batch}, {args.dtype})")
    print_table(rows, "all parts")


if __name__ == "__main__":
    main()
