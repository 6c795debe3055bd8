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

Multi-slice (--num_slices=N > 1): N slices of --accelerator_type joined over the data-center
network, requested as one queued resource named --tpu (its slices are the nodes <tpu>-0 ..
<tpu>-(N-1)). --create queues the request and waits until it is ACTIVE; the same program then
runs on every worker of every slice, and the train step's mesh puts the slices on its data
axis (compile it first with --mode=compile --config.compile.num_slices=N).

    python launch/tpu_pod.py --tpu=udit-2x-v5p-256 --zone=us-east5-a --accelerator_type=v5p-256 \
        --num_slices=2 --create --config=configs/udit_l.py --workdir=gs://BUCKET/udit_l \
        -- --config.batch_size=16384
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator_type", default="v4-8",
                        help="e.g. v4-32, v5p-64, v6e-16 (each slice's, with --num_slices)")
    parser.add_argument("--num_slices", type=int, default=1,
                        help="slices of --accelerator_type, as one queued resource when > 1")
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
    if args.num_slices < 1:
        parser.error(f"--num_slices={args.num_slices}: use 1 (one TPU VM) or more (multi-slice)")
    if not args.workdir.startswith("gs://"):
        parser.error(f"--workdir={args.workdir} must be a gs:// path: every worker writes its "
                     "shards of each checkpoint there")
    return args


def multi_slice(args) -> bool:
    return args.num_slices > 1


def _gcloud(args, *words: str) -> list[str]:
    """A gcloud TPU command: on the TPU VM (`tpu-vm`), or on the queued resource that holds the
    slices (`queued-resources`) when multi-slice."""
    group = "queued-resources" if multi_slice(args) else "tpu-vm"
    cmd = ["gcloud", "compute", "tpus", group, *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def describe_command(args) -> list[str]:
    return _gcloud(args, "describe", args.tpu)


def state_command(args) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)."""
    return describe_command(args) + ["--format=value(state.state)"]


def create_command(args) -> list[str]:
    cmd = _gcloud(args, "create", args.tpu) + [f"--accelerator-type={args.accelerator_type}",
                                                f"--runtime-version={args.runtime_version}"
                                                if multi_slice(args) else
                                                f"--version={args.runtime_version}"]
    if multi_slice(args):
        cmd += [f"--node-count={args.num_slices}", f"--node-prefix={args.tpu}"]
    return cmd + (["--spot"] if args.spot else [])


def _all_workers(args) -> list[str]:
    return (["--node=all"] if multi_slice(args) else []) + ["--worker=all"]


def remote_dir(args) -> str:
    return "udit-jax" if args.repo else REPO_ROOT.name


def _on_all_workers(args, script: str) -> list[str]:
    return _gcloud(args, "ssh", args.tpu) + _all_workers(args) + [f"--command={script}"]


def install_commands(args) -> list[list[str]]:
    steps = []
    if args.repo:
        fetch = [f"(test -d udit-jax || git clone {shlex.quote(args.repo)} udit-jax)",
                 f"(cd udit-jax && git fetch -q origin && git checkout -q {shlex.quote(args.ref)})"]
    else:
        # Copied into ~/ under its own name (copying onto an existing dir refreshes it).
        steps.append(_gcloud(args, "scp", "--recurse", *_all_workers(args), str(REPO_ROOT),
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


# States of a queued resource that will not become ACTIVE without the user.
_QUEUED_DEAD_ENDS = ("FAILED", "SUSPENDED", "SUSPENDING")


def wait_until_active(args, poll_seconds: float = 60.0) -> int:
    """Polls a queued resource until it is ACTIVE (0) or can no longer become so (1)."""
    while True:
        result = subprocess.run(state_command(args), capture_output=True, text=True)
        state = result.stdout.strip() if result.returncode == 0 else "unknown (describe failed)"
        if state == "ACTIVE":
            return 0
        if state in _QUEUED_DEAD_ENDS:
            print(f"queued resource {args.tpu} is {state}; see `{shlex.join(describe_command(args))}`",
                  file=sys.stderr)
            return 1
        print(f"queued resource {args.tpu}: {state}; waiting", flush=True)
        time.sleep(poll_seconds)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    what = "queued resource" if multi_slice(args) else "TPU VM"
    if args.dry_run:
        print("# " + shlex.join(describe_command(args)) + f"   (checks whether the {what} exists)")
        for cmd in plan(args, tpu_exists=not args.create):
            print(shlex.join(cmd))
            if cmd[4] == "create" and multi_slice(args):
                print("# " + shlex.join(state_command(args)) + "   (every minute, until ACTIVE)")
        return 0
    exists = subprocess.run(describe_command(args), capture_output=True).returncode == 0
    if not exists and not args.create:
        print(f"{what} {args.tpu} does not exist in {args.zone}; pass --create to create it",
              file=sys.stderr)
        return 1
    for cmd in plan(args, exists):
        print("+ " + shlex.join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if not rc and cmd[4] == "create" and multi_slice(args):
            rc = wait_until_active(args)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
