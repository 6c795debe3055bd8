"""The TPU pod and SLURM launchers in --dry-run mode: the exact commands they would run."""

import shlex
import subprocess
import sys

import pytest

from tests.test_train import REPO


def dry_run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, f"launch/{script}", "--dry-run", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tpu_pod_dry_run_creates_installs_and_runs_on_all_workers():
    out = dry_run("tpu_pod.py", "--tpu=my-pod", "--zone=us-central2-b", "--accelerator_type=v4-32",
                  "--create", "--spot", "--config=configs/udit_l.py", "--workdir=gs://bucket/udit_l",
                  "--", "--config.batch_size=512", "--config.mesh.rules=fsdp")
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    create, copy, install, run = commands
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod"]
    assert {"--zone=us-central2-b", "--accelerator-type=v4-32", "--spot"} <= set(create)
    assert copy[4:6] == ["scp", "--recurse"] and "--worker=all" in copy
    assert install[4] == "ssh" and "--worker=all" in install
    # The project with its [tpu] extra: our jax and its libtpu, not the newest jax[tpu].
    assert f"python3 -m pip install -e '{REPO.name}[tpu]'" in install[-1], install[-1]
    assert "'jax[tpu]'" not in install[-1]
    assert run[4] == "ssh" and "--worker=all" in run
    remote = run[-1].removeprefix("--command=")
    assert ("python3 -m udit_jax.main --config=configs/udit_l.py --workdir=gs://bucket/udit_l "
            "--mode=train --config.batch_size=512 --config.mesh.rules=fsdp") in remote
    assert "tee -a ~/udit_train.log" in remote


def test_tpu_pod_reuses_a_vm_and_needs_a_bucket():
    out = dry_run("tpu_pod.py", "--tpu=p", "--zone=z", "--repo=https://example.org/u.git",
                  "--ref=v1", "--config=configs/demo.py", "--workdir=gs://b/w")
    assert " create " not in out and " scp " not in out
    assert "git clone https://example.org/u.git udit-jax" in out and "git checkout -q v1" in out
    install = [shlex.split(line)[-1] for line in out.splitlines() if " ssh " in line][0]
    assert "python3 -m pip install -e 'udit-jax[tpu]'" in install, install
    bad = subprocess.run([sys.executable, "launch/tpu_pod.py", "--tpu=p", "--zone=z",
                          "--config=configs/demo.py", "--workdir=/tmp/local", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "must be a gs:// path" in bad.stderr


def test_tpu_pod_multi_slice_queues_the_slices_and_runs_on_every_worker_of_each():
    out = dry_run("tpu_pod.py", "--tpu=two", "--zone=us-east5-a", "--accelerator_type=v5p-256",
                  "--num_slices=2", "--create", "--spot", "--config=configs/udit_l.py",
                  "--workdir=gs://bucket/udit_l", "--", "--config.batch_size=16384")
    lines = out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    create, copy, install, run = commands
    assert all(c[:4] == ["gcloud", "compute", "tpus", "queued-resources"] for c in commands)
    assert create[4:6] == ["create", "two"]
    assert {"--accelerator-type=v5p-256", "--node-count=2", "--node-prefix=two", "--spot",
            "--zone=us-east5-a"} <= set(create)
    # It waits for the queued resource before copying to its nodes.
    wait = lines.index(shlex.join(create)) + 1
    assert lines[wait].startswith("# gcloud compute tpus queued-resources describe two")
    assert "value(state.state)" in lines[wait] and "until ACTIVE" in lines[wait]
    for c in (copy, install, run):
        assert {"--node=all", "--worker=all"} <= set(c), c
    assert run[4:6] == ["ssh", "two"]
    assert ("python3 -m udit_jax.main --config=configs/udit_l.py --workdir=gs://bucket/udit_l "
            "--mode=train --config.batch_size=16384") in run[-1]
    bad = subprocess.run([sys.executable, "launch/tpu_pod.py", "--tpu=p", "--zone=z",
                          "--num_slices=0", "--config=configs/demo.py", "--workdir=gs://b/w",
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--num_slices=0" in bad.stderr


def test_tpu_pod_waits_for_its_queued_resource(monkeypatch, capsys):
    """--create on multi-slice polls the queued resource's state until ACTIVE, and stops with
    a message when it fails."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tpu_pod", REPO / "launch" / "tpu_pod.py")
    tpu_pod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tpu_pod)
    args = tpu_pod.parse_args(["--tpu=q", "--zone=z", "--num_slices=2", "--config=c.py",
                               "--workdir=gs://b/w"])
    for states, want in ((["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0),
                         (["WAITING_FOR_RESOURCES", "FAILED"], 1)):
        replies = iter(states)
        monkeypatch.setattr(tpu_pod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
            cmd, 0, stdout=next(replies) + "\n", stderr=""))
        assert tpu_pod.wait_until_active(args, poll_seconds=0) == want
        assert next(replies, None) is None           # polled until the answer, no further
    assert "queued resource q is FAILED" in capsys.readouterr().err


@pytest.mark.parametrize("script, args", [("tpu_pod.py", ["--tpu=p", "--zone=z"]), ("slurm.py", [])])
def test_dry_run_after_the_separator_is_refused(script, args):
    # Otherwise it would reach udit_jax.main and the launcher would really run.
    result = subprocess.run([sys.executable, f"launch/{script}", *args, "--config=configs/demo.py",
                             "--workdir=gs://b/w", "--", "--dry-run"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "put it before `--`" in result.stderr


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_dry_run_script(per):
    out = dry_run("slurm.py", "--nodes=2", "--gpus_per_node=4", f"--per={per}", "--partition=a100",
                  "--requeue", "--setup=source ~/venv/bin/activate", "--config=configs/udit_b.py",
                  "--workdir=/shared/udit_b", "--", "--config.total_steps=1000")
    lines = out.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --gpus-per-node=4" in lines
    assert f"#SBATCH --ntasks-per-node={4 if per == 'gpu' else 1}" in lines
    assert "#SBATCH --signal=TERM@300" in lines and "#SBATCH --requeue" in lines
    assert "source ~/venv/bin/activate" in lines
    srun = next(l for l in lines if l.startswith("srun "))
    inner = shlex.split(srun)[-1]
    assert inner.startswith("exec python -m udit_jax.main --config=configs/udit_b.py "
                            "--workdir=/shared/udit_b --mode=train --config.total_steps=1000")
    if per == "node":
        assert any(l.startswith("export COORDINATOR=") for l in lines)
        assert '--process_id="$SLURM_PROCID"' in inner and "--local_device_ids=0,1,2,3" in inner
    else:
        assert "--coordinator_address" not in inner  # JAX reads the SLURM environment
