"""Inception feature throughput (images/s) of the FID evaluator on the current backend.

    python benchmarks/bench_inception.py [--weights pt_inception-....pth] [--batch 256]
        [--size 256] [--iters 10]

Times the whole extraction step as evaluate_npz runs it: uint8 images on the devices ->
ADM preprocessing (resize to 299) -> InceptionV3 -> pool3, spatial features, class
probabilities; batch sharded over all devices. Without --weights the network runs on random
weights (the speed does not depend on them). Rows: float32 at "highest" precision (the parity
setting), float32 at the backend's default precision (TF32 on recent GPUs), bfloat16.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import peak_memory_gib, peak_tflops, print_table, time_fn
from udit_jax import parallel
from udit_jax.evaluation.features import _compiled_forward
from udit_jax.evaluation.inception import InceptionV3


def random_variables() -> dict:
    model = InceptionV3()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    # Unit BN statistics keep activations finite through the 94 layers.
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if p[-1].key == "var" else x, variables)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="pytorch-fid weights (optional)")
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--size", type=int, default=256, help="input image size")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    if args.weights:
        from udit_jax.evaluation import load_inception_variables
        variables = load_inception_variables(args.weights)
    else:
        variables = random_variables()
    mesh = parallel.make_mesh()
    batch = -(-args.batch // mesh.size) * mesh.size
    variables = jax.device_put(variables, parallel.replicated(mesh))
    images = np.random.default_rng(0).integers(0, 256, (batch, args.size, args.size, 3), np.uint8)
    images = jax.device_put(images, parallel.batch_sharding(mesh, 4))
    peak = peak_tflops()

    rows = []
    for label, dtype, precision in [("float32 highest", jnp.float32, "highest"),
                                    ("float32 default", jnp.float32, None),
                                    ("bfloat16", jnp.bfloat16, None)]:
        forward = _compiled_forward("adm", dtype, precision)
        compiled = forward.lower(variables, images).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        seconds = time_fn(lambda: forward(variables, images), warmup=2, iters=args.iters)
        tflops = flops / seconds / 1e12 if flops else None
        rows.append({"compute": label, "batch": batch, "img/s": batch / seconds,
                     "ms/batch": 1e3 * seconds, "TFLOP/s": tflops,
                     "MFU(bf16 peak)": (tflops / peak) if (tflops and peak) else None,
                     "peak GiB": peak_memory_gib()})
    print_table(rows, f"Inception features ({args.size}px -> 299, ADM preprocessing)")


if __name__ == "__main__":
    main()
