"""Paths a user types, made safe once at the entry point before anything is written.

    workdir = paths.prepare_workdir("runs/demo/")     # -> "/abs/cwd/runs/demo", checked
    config = paths.resolve_config_paths(config)       # relative config paths -> absolute
    paths.resolve("~/weights.safetensors")            # -> "/home/me/weights.safetensors"

Local paths become absolute (`~` expanded, `.`/`..` and trailing slashes removed): orbax
refuses relative checkpoint paths, and an absolute path means the same thing to every thread
and subprocess whatever their working directory. Symlinks stay as typed (the OS follows
them; a symlinked weights file keeps the name that tells its model). URLs (`gs://bucket/run/`) keep their
form (only trailing slashes go); their storage is checked by the job that opens them.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import socket
import tempfile

# Entries of a directory written by udit_jax jobs (training, encode, export, sample, evaluate).
WORKDIR_ENTRIES = frozenset({"checkpoints", "config.json", "tensorboard", "samples", "export",
                             "latents", "eval", "compile"})
# Config fields holding a local or gs:// path ("" = the job's default, kept as is).
CONFIG_PATH_FIELDS = (
    "data.dir", "data.cache_dir", "vae.weights", "sample.export_dir", "sample.out_dir",
    "export.dir", "eval.reference_npz", "eval.inception_weights", "eval.sample_npz",
    "eval.output_json", "eval.export_dir", "eval.write_reference_to", "compile.cache_dir",
)


def is_url(path: str) -> bool:
    """True for gs://..., s3://... (anything with a scheme), which stay as typed."""
    return "://" in path


def resolve(path: str | os.PathLike) -> str:
    """The absolute form of a local path; a URL without trailing slashes."""
    path = os.fspath(path)
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(path))


def user_cache_dir() -> str:
    """This user's cache of udit_jax (the quality classifier, compiled programs):
    $UDIT_JAX_CACHE, else $XDG_CACHE_HOME/udit_jax, else ~/.cache/udit_jax."""
    if os.environ.get("UDIT_JAX_CACHE"):
        return resolve(os.environ["UDIT_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return resolve(os.path.join(base, "udit_jax"))


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(path: str, flag: str, *, own_entries=WORKDIR_ENTRIES) -> None:
    """Raises ValueError (one line naming `flag` and the fix) unless the resolved local
    directory `path` can be created or reused: not a file (nor under one), writable, and
    either new, empty, or holding at least one of `own_entries` (an earlier run's output).
    Writes nothing but a probe file it removes again."""
    if is_url(path):
        return
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise ValueError(f"{flag}: {path} {where}, not a directory; pass a directory path")
    if existing == path:
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
        if entries and not own_entries.intersection(entries):
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(f"{flag}: {path} is a non-empty directory of something else "
                             f"({shown}); pass a new or empty directory, or the one an earlier "
                             "run wrote")
    try:  # os.access cannot tell (root, read-only mounts); a real write can.
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".udit_jax_write_probe_"):
            pass
    except OSError as e:
        cause = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            cause = f"{existing} is not writable ({cause})"
        raise ValueError(f"{flag}: cannot write to {path}: {cause}; pass a location you can "
                         "write to") from e


def prepare_workdir(workdir: str | None, flag: str = "--workdir") -> str:
    """The resolved --workdir, checked with check_output_dir (ValueError if unusable)."""
    if not workdir or not workdir.strip():
        raise ValueError(f"{flag} is empty; pass the run's directory (local path or gs://...)")
    resolved = resolve(workdir)
    check_output_dir(resolved, flag)
    return resolved


def resolve_config_paths(config):
    """Resolves every set field of CONFIG_PATH_FIELDS in place (relative to the current
    directory, as the user typed them) and returns the config."""
    for field in CONFIG_PATH_FIELDS:
        section, name = field.split(".")
        node = config.get(section)
        if node is not None and node.get(name):
            node[name] = resolve(node[name])
    return config


def prepare_job(config, workdir: str | None) -> str:
    """What the command line does before any job: resolves the config's paths in place and
    returns the checked, resolved workdir."""
    resolve_config_paths(config)
    return prepare_workdir(workdir)


RUN_LOCK_FILE = ".udit_jax.lock"   # hidden: a workdir holding only it still counts as empty


@contextlib.contextmanager
def exclusive_run(workdir: str | os.PathLike, enabled: bool = True):
    """Holds an exclusive lock on a local workdir while a run writes there (flock on
    <workdir>/.udit_jax.lock; the OS drops it when the process ends, however it ends).

    A second run on the same workdir would save and delete the same checkpoint steps and set
    aside the first one's save in progress as "incomplete": it is refused with one line naming
    the run that holds the workdir. URLs and `enabled=False` (the other processes of a
    multi-host run) take no lock."""
    import fcntl
    workdir = os.fspath(workdir)
    if not enabled or is_url(workdir):
        yield
        return
    path = os.path.join(workdir, RUN_LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise ValueError(f"--workdir: {workdir} is in use by another run ({holder}); wait "
                                 "for it to end or stop it, or pass another --workdir") from None
            # A file system without locks (NFS without lockd: ENOLCK) must not stop a run.
            logging.getLogger(__name__).warning(
                "cannot lock %s (%s): nothing stops a second run on this workdir",
                path, os.strerror(e.errno) if e.errno else e)
            locked = False
        if locked:
            now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now}".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock
