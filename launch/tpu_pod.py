"""Run a training config on a Cloud TPU VM or pod slice: create (or reuse) the TPU VM, install
udit-jax on every worker, run the same command on all workers and stream their logs.

    python launch/tpu_pod.py --tpu=udit-v4-32 --zone=us-central2-b --accelerator_type=v4-32 \\
        --config=configs/udit_l.py --workdir=gs://BUCKET/udit_l -- --config.batch_size=256
    python launch/tpu_pod.py ... --dry-run      # print the exact gcloud commands, run nothing

Everything after `--` is passed to `python -m udit_jax.main` unchanged. Every worker runs the
same command; JAX finds the other workers itself (multi-host initialisation is automatic on
TPU VMs), and the workdir must be a gs:// bucket all workers can reach. Rerunning the same
command after a preemption resumes from the latest checkpoint (--create recreates a
deleted spot/preemptible VM).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-32, v5p-64, v6e-16")
    parser.add_argument("--runtime_version", default="tpu-ubuntu2204-base")
    parser.add_argument("--create", action="store_true", help="create the TPU VM if it is missing")
    parser.add_argument("--spot", action="store_true", help="create it as a spot VM")
    parser.add_argument("--repo", default=None, help="git URL to install udit-jax from "
                        "(default: copy this checkout to the workers)")
    parser.add_argument("--ref", default="main", help="branch, tag or commit (with --repo)")
    parser.add_argument("--skip_install", action="store_true", help="workers are already set up")
    parser.add_argument("--config", required=True, help="config path inside the repository")
    parser.add_argument("--workdir", required=True, help="gs://... shared by all workers")
    parser.add_argument("--mode", default="train")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the commands instead of running them")
    parser.add_argument("main_args", nargs="*", help="extra udit_jax.main flags (after --)")
    args = parser.parse_args(argv)
    if {"--dry-run", "--dry_run"} & set(args.main_args):
        parser.error("--dry-run came after `--`, where it would be passed to udit_jax.main; "
                     "put it before `--`")
    if not args.workdir.startswith("gs://"):
        parser.error(f"--workdir={args.workdir} must be a gs:// path: every worker writes its "
                     "shards of each checkpoint there")
    return args


def _gcloud(args, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def describe_command(args) -> list[str]:
    return _gcloud(args, "describe", args.tpu)


def create_command(args) -> list[str]:
    cmd = _gcloud(args, "create", args.tpu) + [f"--accelerator-type={args.accelerator_type}",
                                                f"--version={args.runtime_version}"]
    return cmd + (["--spot"] if args.spot else [])


def remote_dir(args) -> str:
    return "udit-jax" if args.repo else REPO_ROOT.name


def _on_all_workers(args, script: str) -> list[str]:
    return _gcloud(args, "ssh", args.tpu) + ["--worker=all", f"--command={script}"]


def install_commands(args) -> list[list[str]]:
    steps = []
    if args.repo:
        fetch = [f"(test -d udit-jax || git clone {shlex.quote(args.repo)} udit-jax)",
                 f"(cd udit-jax && git fetch -q origin && git checkout -q {shlex.quote(args.ref)})"]
    else:
        # Copied into ~/ under its own name (copying onto an existing dir refreshes it).
        steps.append(_gcloud(args, "scp", "--recurse", "--worker=all", str(REPO_ROOT),
                             f"{args.tpu}:~/"))
        fetch = []
    # The [tpu] extra pins jax[tpu] to the jax this release is tested with, and so the libtpu
    # built for it; a bare `jax[tpu]` would install the newest jax on the workers instead.
    project = shlex.quote(f"{remote_dir(args)}[tpu]")
    script = " && ".join(["python3 -m pip install -U pip", *fetch,
                          f"python3 -m pip install -e {project}"])
    return steps + [_on_all_workers(args, script)]


def train_command(args) -> list[str]:
    main = ["python3", "-m", "udit_jax.main", f"--config={args.config}",
            f"--workdir={args.workdir}", f"--mode={args.mode}", *args.main_args]
    # Each worker's output is streamed back through its ssh session (gcloud prefixes nothing,
    # so the worker id goes in front of each line) and kept in ~/udit_train.log on the worker.
    script = (f"cd {remote_dir(args)} && " + " ".join(shlex.quote(w) for w in main)
              + " 2>&1 | tee -a ~/udit_train.log"
              + " | sed -u \"s/^/[worker $(hostname)] /\"")
    return _on_all_workers(args, script)


def plan(args, tpu_exists: bool) -> list[list[str]]:
    steps = []
    if not tpu_exists:
        steps.append(create_command(args))
    if not args.skip_install:
        steps.extend(install_commands(args))
    steps.append(train_command(args))
    return steps


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        print("# " + shlex.join(describe_command(args)) + "   (checks whether the TPU VM exists)")
        for cmd in plan(args, tpu_exists=not args.create):
            print(shlex.join(cmd))
        return 0
    exists = subprocess.run(describe_command(args), capture_output=True).returncode == 0
    if not exists and not args.create:
        print(f"TPU VM {args.tpu} does not exist in {args.zone}; pass --create to create it",
              file=sys.stderr)
        return 1
    for cmd in plan(args, exists):
        print("+ " + shlex.join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
