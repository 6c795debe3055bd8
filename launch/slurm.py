"""Run a training config on a multi-node GPU cluster with SLURM: writes an sbatch script and
submits it.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu --time=48:00:00 \\
        --config=configs/udit_l.py --workdir=/shared/runs/udit_l -- --config.batch_size=256
    python launch/slurm.py ... --dry-run        # print the script and the sbatch command

Everything after `--` is passed to `python -m udit_jax.main` unchanged. --per=gpu (default)
starts one process per GPU, and JAX reads the coordinator, process count and rank from the
SLURM environment; --per=node starts one process per node driving all of its GPUs, with the
coordinator (first node of the job) and ranks passed explicitly. SLURM sends SIGTERM
--signal_seconds before the time limit (and on preemption): the run saves a checkpoint and
exits, and with --requeue the job restarts and resumes from it. The workdir must be on a
filesystem (or bucket) all nodes share.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
import tempfile

COORDINATOR_PORT = 12355


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--per", choices=["gpu", "node"], default="gpu",
                        help="one process per GPU (default) or per node")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--time", default="24:00:00", help="wall-clock limit")
    parser.add_argument("--cpus_per_gpu", type=int, default=8)
    parser.add_argument("--job_name", default="udit-jax")
    parser.add_argument("--log_dir", default="slurm_logs", help="where %%j.out files go")
    parser.add_argument("--signal_seconds", type=int, default=300,
                        help="SIGTERM this long before the time limit, to checkpoint")
    parser.add_argument("--requeue", action="store_true", help="requeue after preemption/timeout")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run on each node first (module load, venv activate...)")
    parser.add_argument("--python", default="python")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", default="train")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the sbatch script and command instead of submitting")
    parser.add_argument("main_args", nargs="*", help="extra udit_jax.main flags (after --)")
    args = parser.parse_args(argv)
    if {"--dry-run", "--dry_run"} & set(args.main_args):
        parser.error("--dry-run came after `--`, where it would be passed to udit_jax.main; "
                     "put it before `--`")
    return args


def main_command(args) -> str:
    words = [args.python, "-m", "udit_jax.main", f"--config={args.config}",
             f"--workdir={args.workdir}", f"--mode={args.mode}", *args.main_args]
    cmd = " ".join(shlex.quote(w) for w in words)
    if args.per == "node":
        # SLURM_LOCALID would make JAX pin each process to one GPU: name all of them.
        ids = ",".join(str(i) for i in range(args.gpus_per_node))
        cmd += (' --coordinator_address="$COORDINATOR" --num_processes="$SLURM_NTASKS"'
                f' --process_id="$SLURM_PROCID" --local_device_ids={ids}')
    return cmd


def sbatch_script(args) -> str:
    tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
    cpus_per_task = args.cpus_per_gpu * (1 if args.per == "gpu" else args.gpus_per_node)
    directives = {
        "job-name": args.job_name, "nodes": args.nodes, "ntasks-per-node": tasks_per_node,
        "gpus-per-node": args.gpus_per_node, "cpus-per-task": cpus_per_task, "time": args.time,
        "output": f"{args.log_dir}/%j.out", "signal": f"TERM@{args.signal_seconds}",
        "partition": args.partition, "account": args.account, "qos": args.qos,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    if args.requeue:
        lines.append("#SBATCH --requeue")
    lines += ["set -euo pipefail", *args.setup]
    if args.per == "node":
        lines.append('export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
                     f':{COORDINATOR_PORT}"')
    # --signal (without B:) delivers SIGTERM to every task of the step; `exec` makes python
    # itself the task, so it is python that receives it.
    lines.append(f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('exec ' + main_command(args))}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    script = sbatch_script(args)
    if args.dry_run:
        print(script, end="")
        print(f"# submit with: mkdir -p {shlex.quote(args.log_dir)} && sbatch <this script>")
        return 0
    pathlib.Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    print(f"+ sbatch {f.name}", flush=True)
    return subprocess.run(["sbatch", f.name]).returncode


if __name__ == "__main__":
    sys.exit(main())
