"""Sampling jobs: images from an export directory into files, sharded over every device and host.

    python -m udit_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample

    from udit_jax import sample
    sample.run_sampling_job("runs/demo/export", "runs/demo/samples/grid",
                            classes=range(10), per_class=10, sampler="ddim", steps="ddim50")

The sampling itself (samplers, guidance, per-image noise keys, FFN fusion, VAE decoding) is
udit_jax.sampler's, the same that training previews and in-loop evaluation use: this module
adds the files. Image i of a job with seed k is sampler.noise_key(k)'s image i, so it is the
same on 1 or on 256 devices, in any batch, after any number of resumptions.

A job's out_dir:
    job.json          the settings; resuming with other settings into it is refused
    parts/part_<first index>.npz
                      finished images, one file per batch and process (images uint8
                      [n, H, W, C], labels [n], indices [n]); written atomically, kept on resume
    images/<index:06d>.png   one PNG per image (write_png)
    samples.npz       ADM layout, index order: arr_0 uint8 [N, H, W, C] (clip(127.5 x + 128)
                      as the official sample_ddp.py), arr_1 int32 labels [N]
    grid.png          the class grid (classes x per_class), or the first 64 images
With several hosts, out_dir must be storage every host sees (as the workdir of training).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from udit_jax import config as config_lib
from udit_jax import diffusion as diffusion_lib
from udit_jax import export, models, parallel, paths
from udit_jax import sampler as sampler_lib
from udit_jax.diffusion import guidance

GRID_IMAGES = 64  # images in the grid of a job with random classes


def _local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, rows) of a batch-sharded array that this process holds."""
    pieces = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        pieces.setdefault(start, np.asarray(shard.data))
    starts = sorted(pieces)
    rows = np.concatenate([np.arange(s, s + len(pieces[s])) for s in starts])
    return rows, np.concatenate([pieces[s] for s in starts])


# ----------------------------------------------------------------------------------------
# Files.

def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp{jax.process_index()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _finished_indices(parts_dir: epath.Path, num_images: int) -> np.ndarray:
    """bool [num_images]: images some part file holds (the same answer on every process)."""
    done = np.zeros(num_images, bool)
    if jax.process_index() == 0 and parts_dir.exists():
        for path in parts_dir.glob("part_*.npz"):
            with path.open("rb") as f, np.load(f) as part:
                done[part["indices"]] = True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return done


def merge_parts(out_dir: epath.Path, num_images: int, grid_columns: int) -> tuple[epath.Path, epath.Path]:
    """Writes samples.npz (ADM layout, index order) and grid.png from the part files.

    arr_0 is streamed into the archive image by image, so 50,000 images at 512 need no
    more memory than the part files being read at the time.
    """
    import zipfile
    parts = sorted((out_dir / "parts").glob("part_*.npz"))
    part_of = np.full(num_images, -1, np.int64)
    row_of = np.zeros(num_images, np.int64)
    labels = np.zeros(num_images, np.int32)
    shape = None
    for p, path in enumerate(parts):
        with path.open("rb") as f, np.load(f) as part:
            idx = part["indices"]
            part_of[idx], row_of[idx], labels[idx] = p, np.arange(len(idx)), part["labels"]
            shape = shape or tuple(part["images"].shape[1:])
    missing = np.flatnonzero(part_of < 0)
    if missing.size:
        raise RuntimeError(f"{len(missing)} of {num_images} images (e.g. {missing[:5].tolist()}) have "
                           f"no part file in {out_dir / 'parts'}; with several hosts out_dir must be "
                           "storage all of them see. Rerun the job to sample what is missing")
    uses = np.bincount(part_of, minlength=len(parts))
    grid_count = min(num_images, GRID_IMAGES) if grid_columns == 0 else num_images
    grid_images = np.zeros((grid_count,) + shape, np.uint8)
    npz_path = out_dir / "samples.npz"
    tmp = out_dir / ".samples.npz.tmp"
    loaded: dict[int, np.ndarray] = {}
    with tmp.open("wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False, "shape": (num_images,) + shape})
            for i in range(num_images):
                p = int(part_of[i])
                if p not in loaded:
                    with parts[p].open("rb") as pf, np.load(pf) as part:
                        loaded[p] = part["images"]
                image = loaded[p][row_of[i]]
                member.write(np.ascontiguousarray(image).tobytes())
                if i < grid_count:
                    grid_images[i] = image
                uses[p] -= 1
                if uses[p] == 0:
                    del loaded[p]
        with zf.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, labels)
    tmp.replace(npz_path)
    columns = grid_columns or min(8, grid_count)
    grid_path = out_dir / "grid.png"
    _write_atomic(grid_path, sampler_lib.png_bytes(sampler_lib.make_grid(grid_images, columns)))
    return npz_path, grid_path


# ----------------------------------------------------------------------------------------
# Jobs.

# Everything that changes a job's images: a job directory holding another job's images is
# refused, never topped up (two VAEs', two dtypes' or two objectives' images never mix).
_SPEC_KEYS = ("export_created", "export_config_hash", "export_weights_sha256",
              "vae_weights_sha256", "dtype", "objective", "seed", "sampler", "steps",
              "cfg_scale", "guidance_interval", "guide_all_channels", "cfg_channels",
              "transport_options", "num_images", "labels")
# What job.json files written before these keys existed meant.
_SPEC_DEFAULTS = {"objective": "ddpm", "guidance_interval": [0.0, 1.0], "transport_options": {}}


def _check_spec(path: epath.Path, spec: dict) -> None:
    """Refuses an out_dir that holds another job's samples, or files no sampling job wrote."""
    if not path.exists():
        # A folder without job.json may still hold a samples.npz (another tool's, or a
        # moved job's): writing there would replace it.
        paths.check_output_dir(str(path.parent), "sample.out_dir", own_entries=set())
        return
    old = json.loads(path.read_text())
    differs = [k for k in _SPEC_KEYS if old.get(k, _SPEC_DEFAULTS.get(k)) != spec.get(k)]
    if differs:
        raise ValueError(f"{path.parent} holds samples of another job (it differs in "
                         f"{', '.join(differs)}): use another out_dir, or delete that one to start over")


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time)."""
    import hashlib
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_sha256(path: str) -> str:
    stat = epath.Path(path).stat()
    return _file_sha256(str(path), stat.length, int(stat.mtime * 1e9))


def _vae_arguments(info: dict) -> dict:
    return dict(info["vae"]["arguments"] or {}, scaling_factor=info["data"]["latent_scale"])


def _process(info: dict, sampler: str, steps: str, transport_options: dict):
    """What `sampler` integrates for the export `info` describes: its diffusion respaced to
    `steps`, or the sampling function of the transport it records."""
    if config_lib.export_objective(info) == "transport":
        return sampler_lib.transport_process(info["objective"]["transport"], sampler, steps,
                                             transport_options)
    return diffusion_lib.create_diffusion(steps, **info["diffusion"])


@functools.lru_cache(maxsize=8)
def _job_sampler(info_json: str, guide_all_channels: bool, steps: str, sampler: str,
                 cfg_scale: float, guidance_interval: tuple[float, float],
                 transport_options_json: str, vae_json: str | None, mesh,
                 dtype: str) -> sampler_lib.Sampler:
    """The sampler of a job, kept across jobs with the same settings in one process (a
    resumed or repeated job does not compile again)."""
    info = json.loads(info_json)
    model = export.model_from_description(info["model"], dtype)
    if guide_all_channels:
        model = model.clone(cfg_channels=None)
    process = _process(info, sampler, steps, json.loads(transport_options_json))
    vae = None if vae_json is None else models.build_vae(**json.loads(vae_json))
    return sampler_lib.Sampler(model, process, sampler=sampler, cfg_scale=cfg_scale,
                               guidance_interval=guidance_interval, vae=vae, mesh=mesh)


def run_sampling_job(export_dir, out_dir, *, num_images: int | None = None,
                     classes: Sequence[int] | None = None, per_class: int = 1, seed: int = 0,
                     sampler: str = "ddpm", steps: str | None = None, cfg_scale: float = 1.0,
                     guidance_interval=(0.0, 1.0), transport_options: dict | None = None,
                     guide_all_channels: bool = False, per_device_batch: int = 32,
                     write_png: bool = True, vae_weights: str | None = None,
                     max_batches: int | None = None, mesh=None,
                     dtype: str | None = None) -> dict[str, Any]:
    """Samples a job's images into out_dir, resuming whatever an earlier run left there.

    Either `classes` (each repeated per_class times: a grid with one row per class) or
    `num_images` with uniformly random classes drawn from the seed. sampler: one of the
    export's objective (info["objective"]): "ddpm", "ddim", "dpm", or for a transport export
    "ode", "sde". steps: the timestep respacing ("250", "ddim50", "20") or transport time-grid
    points ("250"); default per sampler. guidance_interval: the noise levels where cfg_scale
    applies. transport_options: the ode / sde settings (config.transport_options; default
    base_config's, SiT's sample.py defaults). Every process calls this; each writes the
    images its devices made. max_batches: stop after that many batches (the rest is sampled
    by the next run). dtype: the model's compute dtype (default: the export's, i.e. the
    training dtype; evaluation samples in config.eval.dtype). Returns {"out_dir",
    "num_images", "finished", "npz", "grid"} (npz and grid are None until every image is
    done).
    """
    info = export.read_info(export_dir)
    objective = config_lib.export_objective(info)
    sampler_lib.check_sampler(sampler, objective)
    if transport_options is None:
        transport_options = config_lib.transport_options(config_lib.base_config(), sampler)
    guidance_interval = guidance.check_interval(guidance_interval)
    if (classes is None) == (num_images is None or num_images <= 0):
        raise ValueError("give either classes (a class grid) or num_images > 0 (random classes)")
    if per_device_batch < 1 or per_class < 1:
        raise ValueError(f"per_device_batch={per_device_batch} and per_class={per_class} must be >= 1")
    steps = str(steps or sampler_lib.default_steps(sampler))
    num_classes = info["data"]["num_classes"]
    if classes is not None:
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("classes is empty; list the class ids of the grid rows")
        labels = np.repeat(np.asarray(classes, np.int32), per_class)
        num_images = len(labels)
    else:
        labels = sampler_lib.random_labels(seed, num_images, num_classes)
    sampler_lib.check_labels(labels, num_classes)
    latent = info["data"]["space"] == "latent"
    vae_weights = (vae_weights or info["vae"]["weights"]) if latent else None
    if latent:
        sampler_lib.check_vae_weights(vae_weights)   # before its hash names the job
    dtype = jnp.dtype(dtype or info["model"]["dtype"]).name
    guided = info["model"]["kwargs"].get("cfg_channels", 3)
    spec = {"export_dir": str(export_dir), "export_created": info["metadata"].get("created"),
            "export_config_hash": info["metadata"].get("config_hash"),
            "export_weights_sha256": info["metadata"].get("weights_sha256"),
            "vae_weights_sha256": _weights_sha256(vae_weights) if latent else None,
            "dtype": dtype, "objective": objective, "seed": int(seed), "sampler": sampler,
            "steps": steps, "cfg_scale": float(cfg_scale),
            "guidance_interval": list(guidance_interval),
            "guide_all_channels": bool(guide_all_channels),
            "cfg_channels": None if guide_all_channels or cfg_scale <= 1 else guided,
            "transport_options": dict(transport_options), "num_images": int(num_images),
            "labels": "random" if classes is None else {"classes": classes, "per_class": per_class}}
    _process(info, sampler, steps, transport_options)   # bad steps / options fail here
    out_dir = epath.Path(out_dir)
    _check_spec(out_dir / "job.json", spec)
    mesh = parallel.make_mesh() if mesh is None else mesh
    vae_params = None
    if latent:
        _, vae_params = sampler_lib.load_vae(_vae_arguments(info), vae_weights, mesh)
    model, params, _ = export.load_export(export_dir, mesh=mesh, dtype=dtype)
    sampler_lib.check_settings(model, sampler, cfg_scale)
    job_sampler = _job_sampler(
        json.dumps({k: info.get(k) for k in ("model", "diffusion", "objective")}, sort_keys=True),
        bool(guide_all_channels), steps, sampler, float(cfg_scale), guidance_interval,
        json.dumps(transport_options, sort_keys=True),
        json.dumps(_vae_arguments(info)) if latent else None, mesh, dtype)

    parts_dir = out_dir / "parts"
    if jax.process_index() == 0:
        # job.json first: a folder this job created always says whose it is.
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "job.json").exists():
            _write_atomic(out_dir / "job.json", json.dumps(spec, indent=2).encode())
        parts_dir.mkdir(parents=True, exist_ok=True)
        if write_png:
            (out_dir / "images").mkdir(exist_ok=True)
    _barrier("sample_job_dirs")
    todo = np.flatnonzero(~_finished_indices(parts_dir, num_images)).astype(np.int32)
    batch = per_device_batch * parallel.batch_ways(mesh)
    now = todo if max_batches is None else todo[:max_batches * batch]
    bar = _progress(num_images, num_images - len(todo), sampler, steps, cfg_scale)
    png_writers = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    # The sampler dispatches the next batch before handing one out: files are written while
    # the devices compute.
    for chunk, images in job_sampler.batches(params, vae_params, sampler_lib.noise_key(seed),
                                             labels[now], now, batch):
        rows, local = _local_rows(images)
        valid = rows < len(chunk)
        rows, local = rows[valid], sampler_lib.quantize(local[valid])
        if len(rows):
            indices = now[chunk[rows]]
            if write_png:
                # PNG encoding (zlib) releases the GIL: threads keep pace with fast samplers.
                list(png_writers.map(lambda i, x: (out_dir / "images" / f"{i:06d}.png").write_bytes(
                    sampler_lib.png_bytes(x)), indices, local))
            # The part file is written last: it marks these images as finished.
            _write_atomic(parts_dir / f"part_{indices[0]:09d}.npz",
                          _npz_bytes(images=local, labels=labels[indices], indices=indices))
        if bar is not None:
            bar.update(len(chunk))
    png_writers.shutdown()
    if bar is not None:
        bar.close()
    _barrier("sample_job_parts")
    finished = len(now) == len(todo)
    result = {"out_dir": str(out_dir), "num_images": int(num_images), "finished": finished,
              "npz": None, "grid": None}
    if finished:
        if jax.process_index() == 0:
            merge_parts(out_dir, num_images, per_class if classes is not None else 0)
        _barrier("sample_job_merged")
        result.update(npz=str(out_dir / "samples.npz"), grid=str(out_dir / "grid.png"))
    return result


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _progress(total: int, done: int, sampler: str, steps: str, cfg_scale: float):
    if jax.process_index() != 0:
        return None
    import tqdm
    return tqdm.tqdm(total=total, initial=done, unit="img", dynamic_ncols=True, smoothing=0.1,
                     desc=f"sampling ({sampler} {steps}, cfg {cfg_scale:g})")


def sample_from_config(config, workdir: str) -> dict[str, Any]:
    """`--mode=sample`: a sampling job from an export, settings from config.sample.

    Fields: sample.export_dir ("" = <workdir>/export), sample.num_images (0: the class grid
    sample.classes x sample.per_class; N: N images of random classes), sample.sampler (one
    of the export's objective), sample.steps, sample.cfg_scale, sample.guidance_interval,
    sample.guide_all_channels, sample.seed, sample.per_device_batch, sample.write_png,
    sample.out_dir, config.transport's sampler settings (ode / sde), vae.weights (latent
    models; default: the weights recorded in the export).
    """
    s = config.sample
    workdir = epath.Path(workdir)
    export_dir = epath.Path(s.export_dir) if s.export_dir else workdir / "export"
    settings = config_lib.sampling(config, "sample",
                                   config_lib.export_objective(export.read_info(export_dir)))
    grid = not s.num_images
    # The grid's shape is in the name, so a 100-per-class job does not collide with the 8-per-class
    # grid of the same settings (a clash of same-shape grids of other classes is refused by the job).
    shape = f"grid{len(s.classes)}x{s.per_class}" if grid else str(s.num_images)
    tag = config_lib.sampling_tag(settings) + "-" + shape
    out_dir = epath.Path(s.out_dir) if s.out_dir else workdir / "samples" / tag
    result = run_sampling_job(
        export_dir, out_dir, num_images=None if grid else s.num_images,
        classes=list(s.classes) if grid else None, per_class=s.per_class,
        seed=settings["seed"], sampler=settings["sampler"], steps=settings["steps"],
        cfg_scale=settings["cfg_scale"], guidance_interval=settings["guidance_interval"],
        transport_options=settings["transport_options"],
        guide_all_channels=settings["guide_all_channels"],
        per_device_batch=s.per_device_batch, write_png=s.write_png,
        vae_weights=config.vae.weights or None, mesh=config_lib.make_mesh(config))
    if jax.process_index() == 0:
        from absl import logging
        logging.info("sampled %d images into %s (%s)", result["num_images"], out_dir, result["npz"])
    return result
