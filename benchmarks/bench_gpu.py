"""The model table measured on this host's GPU: train-step img/s, TFLOP/s and MFU, peak memory,
lowering and compile time, per model x per-GPU batch x remat x attention kernel; with the
GPU's measured ceilings and, for programs without loops, a roofline estimate (the model's
FLOPs, XLA's byte count) next to the measured step (the estimate-vs-measured ratio).

Each case runs `benchmarks.bench_train.bench` in a fresh process (its own memory, an out-of-
memory case fails alone), one at a time. Cases start in the order given until --deadline
seconds have passed; every finished case is appended to --json as it ends.

    python -m benchmarks.bench_gpu                       # the default cases, in priority order
    python -m benchmarks.bench_gpu --cases "U-DiT-L:64:1:cudnn" "DiT-XL/2:128:0:xla"
    python -m benchmarks.bench_gpu --cases "U-DiT-B:64:0:xla" "U-DiT-B:64:0:xla:scanned"
    python -m benchmarks.bench_gpu --deadline 420 --json /tmp/gpu.json

A case is MODEL:PER_GPU_BATCH:REMAT:ATTENTION (attention: xla, the float32-softmax attention
of the configs, or cudnn, the fused kernel; both in the configs' bfloat16), and for a U-DiT
optionally :scanned (each stage's blocks as one scan instead of the configs' unrolled blocks:
start-up against step time). MFU and TFLOP/s
count the papers' FLOPs (3 x forward MACs x 2) against the device's datasheet bf16 peak
(udit_jax.parallel.DEVICE_FACTS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.common import MODEL_CONFIGS as CONFIGS, print_table

DEFAULT_CASES = (
    "U-DiT-L:64:1:xla", "DiT-XL/2:64:0:xla", "U-DiT-L:64:1:cudnn", "DiT-XL/2:64:0:cudnn",
    "U-DiT-B:64:0:xla", "U-DiT-S:64:0:xla", "U-DiT-B/512:16:0:xla", "U-DiT-L:64:0:cudnn",
    "DiT-XL/2:128:0:cudnn", "U-DiT-B:64:0:cudnn",
)


def parse_case(case: str) -> dict:
    model, batch, remat, attention, *blocks = case.split(":")
    if (model not in CONFIGS or attention not in ("xla", "cudnn") or remat not in ("0", "1")
            or blocks not in ([], ["scanned"])
            or (blocks and not model.startswith("U-DiT")) or not batch.isdigit()):
        raise ValueError(f"case {case!r}: use MODEL:BATCH:REMAT:ATTENTION with MODEL in "
                         f"{sorted(CONFIGS)}, REMAT 0/1, ATTENTION xla/cudnn, and :scanned "
                         "after it for a U-DiT with each stage's blocks as one scan")
    return {"model": model, "per_gpu": int(batch), "remat": int(remat), "attention": attention,
            "scanned": bool(blocks)}


def case_config(case: dict, devices: int):
    from benchmarks.common import load_config
    config = load_config(CONFIGS[case["model"]], [])
    config.batch_size = case["per_gpu"] * devices
    config.model.remat = bool(case["remat"])
    if case["scanned"]:
        config.model.scan_blocks = True
    config.data.source = "synthetic"
    config.sample_every_steps = 0
    config.eval_every_steps = 0
    if case["attention"] == "cudnn":
        config.model.kwargs.attention_impl = "cudnn"
        config.eval.dtype = "bfloat16"   # cuDNN's attention has no float32 kernel (no eval here)
    return config


def ceilings() -> dict:
    """This GPU's measured ceilings: a bf16 8192^3 matrix product (TFLOP/s) and a device
    copy (TB/s, bytes read + written; 2 GiB), each the median of 10 after warm-up, random data."""
    import jax
    import jax.numpy as jnp
    from benchmarks.common import time_fn
    n = 8192 if jax.default_backend() == "gpu" else 1024     # CPUs: a smoke run
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
    mm = jax.jit(lambda a, b: a @ b)
    matmul_s = time_fn(lambda: mm(a, b), warmup=3, iters=10)
    x = jax.random.normal(jax.random.key(1), (n * n * 8,), jnp.float32)   # 2 GiB on GPUs
    copy = jax.jit(lambda x: x * 1.0 + 0.0)                              # one read, one write
    copy_s = time_fn(lambda: copy(x), warmup=3, iters=10)
    return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "matmul_TFLOP/s": 2 * n**3 / matmul_s / 1e12,
            "copy_TB/s": 2 * x.nbytes / copy_s / 1e12}


def _child(kind: str, arg: str, steps: int, out_path: str) -> None:
    """Runs in the fresh process: one case (or the ceilings), its dict written to out_path."""
    if kind == "ceilings":
        result = ceilings()
    else:
        import jax
        from benchmarks.bench_train import bench
        case = parse_case(arg)
        result = {**case, **bench(case_config(case, jax.device_count()), steps, warmup=2)}
    with open(out_path, "w") as f:
        json.dump(result, f)


def _run(kind: str, arg: str, steps: int, timeout: float, log_dir: str) -> dict:
    """One case in a fresh process; its output goes to log_dir/<case>.log (kept on timeout)."""
    name = re.sub(r"[^\w.-]", "_", arg or kind)
    out_path, log_path = (os.path.join(log_dir, f"{name}.{ext}") for ext in ("json", "log"))
    if os.path.exists(out_path):
        os.remove(out_path)
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--_child", kind, arg,
           "--steps", str(steps), "--_out", out_path]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc = None
    with open(log_path) as log:
        tail = log.read().strip().splitlines()[-12:]
    if proc is None or proc.returncode or not os.path.exists(out_path):
        print("\n".join(tail), file=sys.stderr)
        errors = [line for line in tail if re.match(r"[\w.]*(Error|Exception)\b", line)]
        error = (f"timed out after {timeout:.0f} s" if proc is None
                 else (errors or tail or [f"exit {proc.returncode}"])[-1])
        return {"case": arg, "error": error, "last_output": tail[-1] if tail else None}
    with open(out_path) as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - t0
    return result


def table_row(r: dict, ceil: dict) -> dict:
    """The printed columns of one case; the roofline: the model's FLOPs at the measured matmul
    rate or XLA's bytes at the measured copy rate, whichever takes longer. (XLA's own FLOP
    count leaves out the matmuls it hands to cuBLAS/cuDNN as custom calls: on GPUs it is a
    fraction of the model's, hence the model's count.)"""
    if "error" in r:
        return {"case": r["case"], "error": r["error"]}
    roofline = None
    if r.get("xla_GB/step") and ceil.get("matmul_TFLOP/s"):
        roofline = max(r["model_TFLOP/step"] / ceil["matmul_TFLOP/s"],
                       r["xla_GB/step"] / 1e3 / ceil["copy_TB/s"]) / r["global_batch"] * 1e3
    per_image = r["step_ms"] / r["global_batch"]
    return {"model": r["model"], "batch/GPU": r["per_gpu"], "remat": r["remat"],
            "blocks": "scanned" if r.get("scanned") else "", "attention": r["attention"],
            "step ms": r["step_ms"], "img/s/GPU": r["img/s"],
            "TFLOP/s": r["TFLOP/s"], "MFU": r["MFU"], "peak GiB": r["peak_GiB"],
            "lower s": r["lower_s"], "compile s": r["compile_s"],
            "XLA/model FLOPs": (r["xla_TFLOP/step"] / r["model_TFLOP/step"]
                                if r.get("xla_TFLOP/step") else None),
            "roofline/measured": roofline / per_image if roofline else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    p.add_argument("--steps", type=int, default=15, help="timed steps per case")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no further case starts")
    p.add_argument("--case_timeout", type=float, default=300)
    p.add_argument("--json", default=None, help="append each result to this file (JSON lines)")
    p.add_argument("--log_dir", default=None, help="each case's output (default: a temp folder)")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return _child(*args._child, args.steps, args._out)
    for case in args.cases:
        parse_case(case)   # a bad case is an error before any compute
    start = time.perf_counter()
    left = lambda: (args.deadline - (time.perf_counter() - start)) if args.deadline else None

    def record(result):
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_gpu_")
    os.makedirs(log_dir, exist_ok=True)
    ceil = _run("ceilings", "", 0, args.case_timeout, log_dir)
    record(ceil)
    results = []
    for case in args.cases:
        if left() is not None and left() <= 0:
            print(f"deadline: {case} and later cases not run", flush=True)
            break
        timeout = args.case_timeout if left() is None else min(args.case_timeout, left() + 60)
        results.append(_run("case", case, args.steps, timeout, log_dir))
        record(results[-1])
    # (This process never touches the devices: the cases have them to themselves.)
    print(f"\ntrain step on {ceil.get('device')}: matmul {ceil.get('matmul_TFLOP/s', 0):.0f} "
          f"TFLOP/s, copy {ceil.get('copy_TB/s', 0):.2f} TB/s measured; jax {ceil.get('jax')}")
    print_table([table_row(r, ceil) for r in results if "error" not in r])
    for r in results:
        if "error" in r:
            print(f"{r['case']}: {r['error']}")


if __name__ == "__main__":
    main()
