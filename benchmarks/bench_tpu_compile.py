"""TPU train steps compiled on this host (no TPU): HBM per chip, compile time, and XLA's cost
model estimate of img/s per chip and MFU, for model x topology x mesh x remat x batch.

Each case is `--mode=compile` (udit_jax.compile) of the model's config with the changes of
the case; needs the [tpu] extra. Compiles of full-size models take minutes of CPU each, so
the default is a representative subset; --all runs the whole grid of the issue.

    python -m benchmarks.bench_tpu_compile                        # the subset
    python -m benchmarks.bench_tpu_compile --models U-DiT-L --topologies v5p-8 \\
        --per_chip_batches 16 32 64 --rules data_parallel shard_update fsdp --remat 0 1
    python -m benchmarks.bench_tpu_compile --all --json /tmp/tpu_compile.json

Rules: data_parallel (params, EMA and optimizer state whole on every chip), shard_update (the
same with mesh.shard_update: EMA and optimizer state split over the chips) or fsdp.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import time

from benchmarks.common import MODEL_CONFIGS as CONFIGS, load_config, print_table
from udit_jax import compile as compile_lib
from udit_jax import hlo_cost, parallel

RULES = ("data_parallel", "shard_update", "fsdp")
SUBSET = [  # (model, topology, rules, remat, per-chip batch)
    ("U-DiT-S", "v5e-8", "data_parallel", 0, 32),
    ("U-DiT-B", "v5p-8", "data_parallel", 0, 32),
    ("U-DiT-L", "v5p-8", "data_parallel", 0, 64),
    ("U-DiT-L", "v5p-8", "fsdp", 1, 64),
    ("DiT-XL/2", "v5p-8", "data_parallel", 0, 64),
]


def case_config(model: str, topology: str, rules: str, remat: int, per_chip: int, scan: bool):
    config = load_config(CONFIGS[model], [])
    chips = compile_lib.parse_topology(topology).chips
    config.compile.topology = topology
    config.batch_size = per_chip * chips      # weak scaling: the global batch grows with chips
    config.model.remat = bool(remat)
    config.mesh.rules = "data_parallel" if rules == "shard_update" else rules
    config.mesh.shard_update = rules == "shard_update"
    if rules == "fsdp":                       # params and optimizer state over up to 8 chips
        config.mesh.fsdp, config.mesh.data = min(chips, 8), -1
    config.model.scan_blocks = scan and model.startswith("U-DiT")
    return config


def run_case(model, topology, rules, remat, per_chip, scan) -> dict:
    config = case_config(model, topology, rules, remat, per_chip, scan)
    start = time.perf_counter()
    r = compile_lib.compile_report(config)
    hbm = r["hbm_bytes_per_chip"]["total"]
    ratio = (r["xla_flops_per_chip"] / r["model_flops_per_chip"]) if "xla_flops_per_chip" in r else None
    return {"model": model, "topology": topology, "rules": rules, "remat": remat,
            "scan": int(scan) if model.startswith("U-DiT") else None, "batch/chip": per_chip,
            "HBM GiB": hbm / 2**30, "fits": r["fits"], "compile s": r["compile_seconds"],
            "compile CPU-s": r["compile_cpu_seconds"], "case s": time.perf_counter() - start,
            "est ms/step": 1e3 * r["estimated_step_seconds"] if r.get("estimated_step_seconds") else None,
            "est img/s/chip": r.get("estimated_images_per_second_per_chip"),
            "est MFU": r.get("estimated_mfu"), "XLA/model FLOPs": ratio,
            # The estimate's share spent in matmuls / convolutions (the rest is memory-bound).
            "matmul share": next((k["share"] for k in r.get("cost_by_kind", [])
                                  if k["kind"] == hlo_cost.MATMUL), None)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(CONFIGS))
    p.add_argument("--topologies", nargs="+")
    p.add_argument("--rules", nargs="+", default=["data_parallel"], choices=RULES)
    p.add_argument("--remat", nargs="+", type=int, default=[0], choices=[0, 1])
    p.add_argument("--per_chip_batches", nargs="+", type=int, default=[32])
    p.add_argument("--scan", nargs="+", type=int, default=[0], choices=[0, 1],
                   help="U-DiT scan_blocks (0: unrolled blocks, the configs'; 1: scanned stages)")
    p.add_argument("--all", action="store_true", help="the issue's whole grid (hours of CPU)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.all:
        cases = [(m, t, r, rm, b, 0) for m in CONFIGS for t in ("v5e-8", "v5p-8", "v6e-8")
                 for r in RULES for rm in (0, 1) for b in (16, 32, 64)]
        cases += [("U-DiT-L", "v5p-256", r, rm, b, 0) for r in RULES
                  for rm in (0, 1) for b in (16, 32, 64)]
    elif args.models or args.topologies:
        cases = list(itertools.product(args.models or ["U-DiT-S"], args.topologies or ["v5p-8"],
                                       args.rules, args.remat, args.per_chip_batches, args.scan))
    else:
        cases = [c + (0,) for c in SUBSET]
    rows = []
    for case in cases:
        rows.append(run_case(*case))
        print_table(rows[-1:], "" if len(rows) > 1 else "TPU train steps compiled on this host "
                    f"({parallel.host_cores()} cores, {compile_lib.host_allocator()} malloc)")
    print_table(rows, "all cases")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process CPU: {usage.ru_utime + usage.ru_stime:.0f} s (user+sys); peak RSS "
          f"{usage.ru_maxrss / 2**20:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
