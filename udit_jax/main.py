"""Command-line entry point.

    python -m udit_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m udit_jax.main --config=configs/udit_b.py --workdir=gs://bucket/udit_b \\
        --config.batch_size=512 --config.mesh.rules=fsdp

--mode: train (default), encode (VAE latent cache, udit_jax.data), export, sample and
evaluate (delegated to their modules). On a TPU pod or a SLURM job run the same command in
every process; multi-host JAX is initialised automatically there, and from
--coordinator_address/--num_processes/--process_id on other GPU clusters.
"""

from __future__ import annotations

import importlib
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (local "
                               "path or gs://...).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "encode", "export", "sample", "evaluate"],
                          "What to do with the config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (GPU "
                                   "clusters without SLURM); auto-detected on TPU pods and SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with "
                                   "--coordinator_address).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "GPUs this process drives "
                                      "(SLURM with one process per node: all of them).")
_VERBOSE_CHECKPOINTS = flags.DEFINE_bool("verbose_checkpoints", False, "Show orbax's INFO logs.")

flags.mark_flags_as_required(["config", "workdir"])

# mode -> (module, function(config, workdir)); modules land with their own issues.
_MODES = {
    "train": ("udit_jax.train", "train_and_evaluate"),
    "encode": ("udit_jax.data", "encode_dataset"),
    "export": ("udit_jax.export", "export_from_config"),
    "sample": ("udit_jax.sample", "sample_from_config"),
    "evaluate": ("udit_jax.evaluation", "evaluate_from_config"),
}


class _QuietOrbax(py_logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno > py_logging.INFO or "/orbax/" not in record.pathname


def mode_function(mode: str):
    module_name, function_name = _MODES[mode]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise app.UsageError(f"--mode={mode} is not available yet: {module_name} cannot be "
                             f"imported ({e})") from e
    if not hasattr(module, function_name):
        raise app.UsageError(f"--mode={mode} is not available yet: {module_name}.{function_name} "
                             "does not exist in this version")
    return getattr(module, function_name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _VERBOSE_CHECKPOINTS.value:
        logging.get_absl_handler().addFilter(_QuietOrbax())
    from udit_jax import parallel
    parallel.set_cpu_devices(_CONFIG.value.mesh.get("cpu_devices", 0))   # before JAX starts
    local_ids = None if _LOCAL_DEVICE_IDS.value is None else [int(i) for i in _LOCAL_DEVICE_IDS.value]
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    local_ids)
    import jax
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 parallel.device_kind())
    mode_function(_MODE.value)(_CONFIG.value, _WORKDIR.value)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
