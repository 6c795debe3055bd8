"""Checkpoint checksums: what the sha256 manifest costs, and that the training thread never pays it.

    python -m benchmarks.bench_checkpoint                  # 0.25 and 1 GB states
    python -m benchmarks.bench_checkpoint --gb 4 --repeats 3

Table 1: seconds per GB to write (hash) and to verify the manifest of a saved checkpoint
(wall and CPU time, page cache warm as right after a save). Table 2: one asynchronous save
through udit_jax.checkpoints.Checkpointer with and without the manifest: the time save()
blocks the caller (the training thread; the step time sees only this) and the time until the
step is committed (the manifest is hashed in orbax's background thread, before the commit).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
from etils import epath

from benchmarks.common import device_name, print_table
from udit_jax import checkpoints


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_state(gb: float) -> dict[str, np.ndarray]:
    """Float32 leaves of 16 MB (a U-DiT-L state is ~4 GB: params, EMA, Adam mu and nu)."""
    n = max(1, int(gb * 2**30 / (16 * 2**20)))
    rng = np.random.default_rng(0)
    return {f"leaf_{i:04d}": rng.standard_normal(4 * 2**20, dtype=np.float32) for i in range(n)}


class _Steps:
    def get_state(self):
        return {"index": 0}


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", default="0.25,1")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    hash_rows, save_rows = [], []
    for gb in [float(g) for g in args.gb.split(",")]:
        state = make_state(gb)
        size = sum(a.nbytes for a in state.values()) / 2**30
        for manifest in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = checkpoints.Checkpointer(tmp, keep=args.repeats + 1)
                if not manifest:
                    ckpt._manifest_before_commit = lambda: None   # what the checksums cost
                blocking, committed = [], []
                for step in range(1, args.repeats + 1):
                    t0 = time.perf_counter()
                    ckpt.save(step, state, _Steps())
                    blocking.append(time.perf_counter() - t0)
                    ckpt.manager.wait_until_finished()
                    committed.append(time.perf_counter() - t0)
                ckpt.close()
                save_rows.append({"GB": round(size, 3), "manifest": manifest,
                                  "save() blocks s": min(blocking),
                                  "until committed s": min(committed)})
                if manifest:
                    step_dir = epath.Path(tmp) / "checkpoints" / str(args.repeats)
                    write = [timed(lambda: checkpoints.write_manifest(step_dir))
                             for _ in range(args.repeats)]
                    verify = [timed(lambda: checkpoints.verify_manifest(step_dir))
                              for _ in range(args.repeats)]
                    w, v = min(write), min(verify)
                    hash_rows.append({"GB": round(size, 3), "write s/GB": w[0] / size,
                                      "write CPU s/GB": w[1] / size, "verify s/GB": v[0] / size,
                                      "verify CPU s/GB": v[1] / size})
    print_table(hash_rows, f"checksum manifest (sha256) on {device_name()}")
    print_table(save_rows, "asynchronous save with and without the manifest")


if __name__ == "__main__":
    main()
