"""Forward and train-step throughput of a model on the current backend.

    python -m benchmarks.bench_model --model U-DiT-B --batch 64 --dtype bfloat16
    python -m benchmarks.bench_model --model U-DiT-S --batch 4 --input_size 16   # quick CPU check

FLOPs are counted as the papers count them: forward = 2 x MACs (model_info, torchprofile
rules); a train step (forward + backward) = 3 x forward. The forward row runs the inference
(fused) form, as sampling does; the train row the training form, with AdamW.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import peak_memory_gib, peak_tflops, print_table, time_fn
from udit_jax import models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="U-DiT-S")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--input_size", type=int, default=None)
    parser.add_argument("--attention_impl", default=None, choices=[None, "xla", "cudnn"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip_train", action="store_true")
    args = parser.parse_args(argv)

    overrides = dict(dtype=jnp.dtype(args.dtype), remat=args.remat, attention_impl=args.attention_impl)
    if args.input_size:
        overrides["input_size"] = args.input_size
    model = models.build_model(args.model, **overrides)
    info = models.model_info(model)
    key = jax.random.key(0)
    params = models.init_params(model, key)
    x, t, y = model.example_inputs(args.batch)
    x = jax.random.normal(key, x.shape)
    t = jax.random.randint(key, t.shape, 0, 1000)
    rows = []
    peak = peak_tflops()

    def row(mode, seconds, gmacs, factor):
        tflops = factor * 2 * gmacs * 1e9 * args.batch / seconds / 1e12
        return {"model": args.model, "mode": mode, "dtype": args.dtype, "batch": args.batch,
                "img/s": args.batch / seconds, "ms/step": 1e3 * seconds, "TFLOP/s": tflops,
                "MFU": None if peak is None or args.dtype != "bfloat16" else tflops / peak,
                "peak GiB": peak_memory_gib()}

    inference = model.inference_form()
    if inference is not model:
        from udit_jax.models.udit import fuse_ffn_params
        inf_params = fuse_ffn_params(params)
    else:
        inf_params = params
    forward = jax.jit(lambda p, x, t, y: inference.apply({"params": p}, x, t, y))
    rows.append(row("forward", time_fn(lambda: forward(inf_params, x, t, y), iters=args.iters),
                    info["gmacs_fused"], 1))

    if not args.skip_train:
        opt = optax.adamw(1e-4, weight_decay=0.0)
        opt_state = opt.init(params)

        @jax.jit
        def train_step(p, s, x, t, y):
            loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2))(p)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        state = {"p": params, "s": opt_state}

        def step():
            state["p"], state["s"], loss = train_step(state["p"], state["s"], x, t, y)
            return loss

        rows.append(row("train", time_fn(step, iters=args.iters), info["gmacs"], 3))
    print_table(rows, f"{args.model}: {info['params'] / 1e6:.2f}M params, {info['gmacs']:.2f} GMACs "
                      f"(fused {info['params_fused'] / 1e6:.2f}M, {info['gmacs_fused']:.2f} GMACs)")


if __name__ == "__main__":
    main()
