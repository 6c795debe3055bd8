"""Command-line entry point.

    python -m udit_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m udit_jax.main --config=configs/udit_b.py --workdir=gs://bucket/udit_b \\
        --config.batch_size=512 --config.mesh.rules=fsdp

--mode: train (default), encode (VAE latent cache, udit_jax.data), export, sample and
evaluate (delegated to their modules). On a TPU pod or a SLURM job run the same command in
every process; multi-host JAX is initialised automatically there, and from
--coordinator_address/--num_processes/--process_id on other GPU clusters.

Errors: an expected error (errors.EXPECTED: a bad config value, bad input data, a missing or
unreadable file, an incompatible checkpoint, a diverged run) ends the command with one line
`error: ...` on stderr and exit status 1; --debug shows its traceback instead. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from udit_jax import errors, paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (local "
                               "path or gs://...).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "encode", "export", "sample", "evaluate", "compile"],
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
_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of expected errors (bad "
                           "config, input or files) instead of one line.")

flags.mark_flags_as_required(["config", "workdir"])

# mode -> (module, function(config, workdir)); imported on use, so a mode loads only its job.
_MODES = {
    "train": ("udit_jax.train", "train_and_evaluate"),
    "encode": ("udit_jax.data", "encode_dataset"),
    "export": ("udit_jax.export", "export_from_config"),
    "sample": ("udit_jax.sample", "sample_from_config"),
    "evaluate": ("udit_jax.evaluation", "evaluate_from_config"),
    "compile": ("udit_jax.compile", "compile_from_config"),
}


class _QuietOrbax(py_logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno > py_logging.INFO or "/orbax/" not in record.pathname


def mode_function(mode: str):
    module_name, function_name = _MODES[mode]
    return getattr(importlib.import_module(module_name), function_name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # JAX logs each backend it could not start ("Unable to initialize backend 'tpu'") at INFO.
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)
    if not _VERBOSE_CHECKPOINTS.value:
        logging.get_absl_handler().addFilter(_QuietOrbax())
    try:
        workdir = paths.prepare_job(_CONFIG.value, _WORKDIR.value)   # before anything is written
        run_mode(_MODE.value, _CONFIG.value, workdir)
    except errors.EXPECTED as e:
        if _DEBUG.value:
            raise
        errors.report(e)
        sys.exit(1)


def run_mode(mode: str, config, workdir: str) -> None:
    from udit_jax import config as config_lib
    from udit_jax import cpu_host, parallel
    config_lib.check_values(config)   # every mode: bad values fail before any work
    # Off a TPU VM, JAX starts on the CPU without loading libtpu (whose start there prints a
    # page of TPU worker-hostname errors); --mode=compile's TPU topologies load it later.
    parallel.skip_tpu_backend_without_tpu()
    parallel.set_cpu_devices(config.mesh.cpu_devices)   # before JAX starts its CPU backend
    cpu_host.run_single_device_steps_inline()            # likewise
    local_ids = None if _LOCAL_DEVICE_IDS.value is None else [int(i) for i in _LOCAL_DEVICE_IDS.value]
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    local_ids)
    import jax
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 parallel.device_kind())
    cpu_host.keep_freed_memory_on_cpu()   # CPU steps reuse their buffers, no page faults
    if mode != "compile":   # --mode=compile reports what compiling costs: never from a cache
        parallel.use_compilation_cache(config.compile)
    mode_function(mode)(config, workdir)


def _missing_field(e: Exception) -> tuple[str, str]:
    """(field, ml_collections' "Did you mean ..." or "") of a config override naming no field.

    ml_collections raises AttributeError wrapping a KeyError whose text is "'name'" plus, for a
    near miss, a second line with its suggestion."""
    inner = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
    text = str(inner.args[0]) if inner.args else str(inner)
    first, _, rest = text.partition("\n")
    return first.strip("\"' "), rest.strip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every mistake reported as one line `error: ...`: absl's own
    (a value of the wrong type, a missing required flag), and config-file and config-override
    mistakes (which ml_collections raises as plain exceptions) instead of a traceback."""
    # The shell leaves a `~` after `--config=` unexpanded, as after `--workdir=` (which paths expands).
    argv = [f"--config={os.path.expanduser(a[len('--config='):])}" if a.startswith("--config=") else a
            for a in argv]
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:     # absl would print two lines: "FATAL Flags parsing error" + help
        print(f"error: {errors.one_line(e)} (python -m udit_jax.main --helpshort lists the flags)",
              file=sys.stderr)
    except (AttributeError, KeyError) as e:   # --config.<field> names no field
        missing, hint = _missing_field(e)
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        named = [g for g in given if missing in g.split(".")] or given
        hint = f" {hint}" if hint else ""
        print(f"error: {', '.join(named)}: the config has no field {missing!r}.{hint} (the fields "
              "are those of the config file; see udit_jax/config.py base_config)", file=sys.stderr)
    except SyntaxError as e:
        print(f"error: config file {e.filename} line {e.lineno}: {e.msg}", file=sys.stderr)
    except errors.EXPECTED as e:
        errors.report(e)
    sys.exit(1)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
