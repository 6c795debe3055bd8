"""Sampling jobs: images from an export directory, sharded over every device and host.

    python -m udit_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample

    from udit_jax import diffusion, export, sample
    model, params, info = export.load_export("runs/demo/export")
    d = diffusion.create_diffusion("ddim50", **info["diffusion"])
    x = sample.sample_images(model, params, d, labels, jax.random.key(0), cfg_scale=4.0,
                             sampler="ddim")                  # float [N, H, W, C], about [-1, 1]
    sample.run_sampling_job("runs/demo/export", "runs/demo/samples/grid",
                            classes=range(10), per_class=10, sampler="ddim", steps="ddim50")

Samplers: "ddpm" (ancestral with the learned variance, the papers' 250 respaced steps),
"ddim" (eta = 0; steps "ddimN" or "N") and "dpm" (DPM-Solver++(2M), ~20 steps). Classifier-
free guidance when cfg_scale > 1 (as the official scripts), on the first 3 output channels
as officially or on all of them (guide_all_channels; in Python pass
model.clone(cfg_channels=None)). Latent models are decoded with the SD VAE; pixel models
are not, and their x_0 predictions are clipped to [-1, 1].

Determinism: image i (its index in the job) starts from noise drawn with
fold_in(fold_in(key, i), 0) and takes its step-t noise from fold_in(fold_in(key, i), t + 1),
so an image depends on the seed, its index and the sampler settings only: the same on 1 or
on 256 devices, in any batch, after any number of resumptions.

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
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

SAMPLERS = ("ddpm", "ddim", "dpm")
DEFAULT_STEPS = {"ddpm": "250", "ddim": "ddim50", "dpm": "20"}
GRID_IMAGES = 64  # images in the grid of a job with random classes


def job_config_defaults() -> dict[str, Any]:
    """`config.sample` fields of sampling jobs beyond the preview ones (classes, per_class,
    sampler, steps, cfg_scale, seed), with defaults (train.base_config() holds them)."""
    return {
        "num_images": 0,            # 0: the class grid (classes x per_class); N: N random classes
        "per_device_batch": 32,     # images per device per batch (CFG doubles the model batch)
        "export_dir": "",           # "" = <workdir>/export
        "out_dir": "",              # "" = <workdir>/samples/<sampler>-<steps>-cfg<s>-seed<k>-<N>
        "write_png": True,          # one PNG per image besides the .npz
        "guide_all_channels": False,  # CFG on every output channel instead of the official 3
    }


# ----------------------------------------------------------------------------------------
# The sampling computation.

def quantize(images: np.ndarray) -> np.ndarray:
    """uint8 images as the official scripts store them: clip(127.5 x + 128, 0, 255), truncated."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def inference_model(model, params):
    """(model, params) as used for sampling: U-DiT's FFNs re-parameterised (fused), as the
    official code samples after `.eval()`; other models unchanged."""
    if getattr(model, "has_rep_ffn", False) and not model.fused_ffn:
        from udit_jax.models.udit import fuse_ffn_params
        return model.inference_form(), jax.jit(fuse_ffn_params)(params)
    return model, params


def guided_model_fn(model, params, cfg_scale: float) -> Callable:
    """model_fn(x [n, H, W, C], t [n], y [n]) -> [n, H, W, C_out], guided when cfg_scale > 1.

    The guided output of each image is the official forward_with_cfg's first half (the
    model's `cfg_channels` guided, the rest conditional). Each image's conditional and
    unconditional rows sit next to each other in the model batch, so a batch sharded over
    devices stays where it is (the official [cond; uncond] halves would move rows between
    devices).
    """
    if cfg_scale <= 1.0:
        return lambda x, t, y: model.apply({"params": params}, x, t, y)
    from udit_jax.models.layers import guided_output

    def model_fn(x, t, y):
        n = x.shape[0]
        pair = lambda a: jnp.repeat(a, 2, axis=0)   # [a0, a0, a1, a1, ...]
        y_pair = jnp.stack([y, jnp.full_like(y, model.num_classes)], axis=1).reshape(-1)
        out = model.apply({"params": params}, pair(x), pair(t), y_pair)
        out = out.reshape((n, 2) + out.shape[1:])
        return jax.vmap(lambda o: guided_output(o, cfg_scale, model.cfg_channels)[0])(out)

    return model_fn


def _check_cfg_scale(cfg_scale: float) -> None:
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale={cfg_scale} must be finite and >= 0 (up to 1: no guidance; "
                         "the papers guide with 1.5 or 4)")


def check_settings(model, sampler: str, cfg_scale: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; use one of {SAMPLERS}")
    _check_cfg_scale(cfg_scale)
    if cfg_scale > 1.0 and not model.class_dropout_prob > 0:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional (null class) embedding, "
                         "which models trained with class_dropout_prob=0 lack; use cfg_scale=1")


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"class labels {sorted(set(bad.tolist()))[:10]} are outside [0, "
                         f"{num_classes}) of this model")


def make_batch_sampler(model, diffusion, *, sampler: str = "ddpm", cfg_scale: float = 1.0,
                       vae=None, mesh=None, clip_denoised: bool | None = None) -> Callable:
    """A jitted fn(params, vae_params, key, indices [B], labels [B]) -> images [B, H, W, C].

    model: the model to run (see inference_model). indices: the images' job indices (their
    noise comes from fold_in(key, index)); labels: their classes. The output is float32,
    decoded with `vae` (vae_params) for latent models, about [-1, 1], not clipped; sharded
    over the batch when a mesh is given. clip_denoised defaults to pixel space (no vae).
    """
    from udit_jax import parallel
    from udit_jax.diffusion import sampling
    check_settings(model, sampler, cfg_scale)
    clip = vae is None if clip_denoised is None else clip_denoised
    sample_shape = (model.input_size, model.input_size, model.in_channels)

    def per_image_normal(keys, salt):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), sample_shape,
                                                    jnp.float32))(keys)

    def sample(params, vae_params, key, indices, labels):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
        x_t = per_image_normal(keys, 0)
        model_fn = guided_model_fn(model, params, cfg_scale)
        kwargs = {"y": labels}
        if sampler == "ddpm":
            # p_sample_loop draws its step noise for the whole batch from one key; here each
            # image's comes from its own key, which is what makes images batch-independent.
            def step(x, t, _):
                t_batch = jnp.full((x.shape[0],), t, jnp.int32)
                out = diffusion.p_sample(model_fn, x, t_batch, noise=per_image_normal(keys, t + 1),
                                         clip_denoised=clip, model_kwargs=kwargs)
                return out["sample"], None
            x, _ = sampling.run_steps(step, x_t, diffusion.num_timesteps, None, progress=None,
                                      label="ddpm", return_trajectory=False)
        elif sampler == "ddim":
            x = diffusion.ddim_sample_loop(model_fn, x_t.shape, noise=x_t, clip_denoised=clip,
                                           model_kwargs=kwargs)
        else:
            x = diffusion.dpm_solver_sample_loop(model_fn, x_t.shape, noise=x_t,
                                                 clip_denoised=clip, model_kwargs=kwargs)
        if vae is not None:
            from udit_jax.models.vae import decode_latents
            x = decode_latents(vae, vae_params, x)
        return x

    if mesh is None:
        return jax.jit(sample)
    return jax.jit(sample, out_shardings=parallel.batch_sharding(mesh, 4))


def _global_array(mesh, host: np.ndarray) -> jax.Array:
    """A batch-sharded global array from a host array every process holds in full."""
    from udit_jax import parallel
    sharding = parallel.batch_sharding(mesh, host.ndim)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, rows) of a batch-sharded array that this process holds."""
    pieces = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        pieces.setdefault(start, np.asarray(shard.data))
    starts = sorted(pieces)
    rows = np.concatenate([np.arange(s, s + len(pieces[s])) for s in starts])
    return rows, np.concatenate([pieces[s] for s in starts])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sample_images(model, params, diffusion, labels, key, *, cfg_scale: float = 1.0,
                  sampler: str = "ddpm", vae=None, vae_params=None, mesh=None,
                  indices: Sequence[int] | None = None, batch_size: int | None = None,
                  clip_denoised: bool | None = None) -> np.ndarray:
    """Samples one image per label; returns float32 [N, H, W, C], about [-1, 1] (see quantize).

    model/params: training or inference form (U-DiT FFNs are fused here). diffusion: e.g.
    create_diffusion("250") (ddpm), ("ddim50") (ddim), ("20") (dpm). key: a PRNG key; image
    j's noise comes from fold_in(key, indices[j]) (indices default 0..N-1). vae/vae_params:
    decode latents (latent models). mesh: shard the batch over its devices (all devices by
    default). batch_size: images per call (default all, rounded up to the device count).
    Single process; run_sampling_job scales to several hosts and to files.
    """
    from udit_jax import parallel
    if jax.process_count() > 1:
        raise ValueError("sample_images runs in one process; use run_sampling_job on several hosts")
    labels = np.asarray(labels, np.int32).reshape(-1)
    _check_labels(labels, model.num_classes)
    n = len(labels)
    indices = np.arange(n, dtype=np.int32) if indices is None else np.asarray(indices, np.int32)
    if indices.shape != labels.shape:
        raise ValueError(f"indices has shape {indices.shape}, labels {labels.shape}")
    mesh = parallel.make_mesh() if mesh is None else mesh
    batch = _round_up(batch_size or n, mesh.size)
    model, params = inference_model(model, params)
    params = jax.device_put(params, parallel.replicated(mesh))
    if vae_params is not None:
        vae_params = jax.device_put(vae_params, parallel.replicated(mesh))
    fn = make_batch_sampler(model, diffusion, sampler=sampler, cfg_scale=cfg_scale, vae=vae,
                            mesh=mesh, clip_denoised=clip_denoised)
    out = []
    for start in range(0, n, batch):
        idx = _pad(indices[start:start + batch], batch, fill=0)
        lab = _pad(labels[start:start + batch], batch, fill=0)
        images = fn(params, vae_params, key, _global_array(mesh, idx), _global_array(mesh, lab))
        out.append(np.asarray(images)[:min(batch, n - start)])
    return np.concatenate(out)


def _pad(x: np.ndarray, size: int, fill: int) -> np.ndarray:
    return np.concatenate([x, np.full(size - len(x), fill, x.dtype)]) if len(x) < size else x


def random_labels(seed: int, num_images: int, num_classes: int) -> np.ndarray:
    """Uniform class labels [num_images] int32; label i depends on (seed, i) only."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    draw = jax.jit(jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0,
                                                         num_classes)))
    return np.asarray(draw(jnp.arange(num_images, dtype=jnp.int32)), np.int32)


def noise_key(seed: int) -> jax.Array:
    """The key whose fold_in(., i) gives image i's noise in a job with this seed."""
    return jax.random.fold_in(jax.random.key(seed), 0)


# ----------------------------------------------------------------------------------------
# Files.

def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp{jax.process_index()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """[rows * H, columns * W, C] from images [n, H, W, C] filled row by row (blank padding)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, h, w, c), images.dtype)
    padded[:n] = images
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


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
    _write_atomic(grid_path, _png_bytes(make_grid(grid_images, columns)))
    return npz_path, grid_path


# ----------------------------------------------------------------------------------------
# Jobs.

# Everything that changes a job's images: a job directory holding another job's images is
# refused, never topped up (two VAEs' or two dtypes' images never mix in one samples.npz).
_SPEC_KEYS = ("export_created", "export_config_hash", "export_weights_sha256",
              "vae_weights_sha256", "dtype", "seed", "sampler", "steps", "cfg_scale",
              "guide_all_channels", "cfg_channels", "num_images", "labels")


def _check_spec(path: epath.Path, spec: dict) -> None:
    if not path.exists():
        return
    old = json.loads(path.read_text())
    differs = [k for k in _SPEC_KEYS if old.get(k) != spec.get(k)]
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
    arguments = dict(info["vae"].get("arguments") or {})
    arguments["scaling_factor"] = info["data"]["latent_scale"]
    return arguments


def _vae_weights_file(info: dict, weights: str | None) -> str:
    """The SD VAE weights a latent job decodes with: `weights`, else the export's record."""
    weights = weights or info["vae"].get("weights")
    if not weights:
        raise ValueError("this is a latent-space model: set the SD VAE weights (config.vae.weights, "
                         "or vae_weights=), e.g. sd-vae-ft-ema's diffusion_pytorch_model.safetensors")
    if not epath.Path(weights).is_file():
        raise FileNotFoundError(f"VAE weights not found: {weights}; set config.vae.weights "
                                "(vae_weights=) to the SD VAE weights file")
    return str(weights)


def _load_vae_params(info: dict, weights: str, mesh):
    from udit_jax import models, parallel
    from udit_jax.convert.vae import load_vae_params
    vae = models.build_vae(**_vae_arguments(info))
    return jax.device_put(load_vae_params(vae, weights), parallel.replicated(mesh))


@functools.lru_cache(maxsize=8)
def _job_sampler(model_json: str, guide_all_channels: bool, diffusion_json: str, steps: str,
                 sampler: str, cfg_scale: float, vae_json: str | None, mesh,
                 dtype: str | None = None) -> Callable:
    """The batch sampler of a job, kept across jobs with the same settings in one process
    (a resumed or repeated job does not compile again)."""
    from udit_jax import diffusion as diffusion_lib
    from udit_jax import export, models
    model = export.model_from_description(json.loads(model_json), dtype)
    if guide_all_channels:
        model = model.clone(cfg_channels=None)
    diffusion = diffusion_lib.create_diffusion(steps, **json.loads(diffusion_json))
    vae = None if vae_json is None else models.build_vae(**json.loads(vae_json))
    return make_batch_sampler(model.inference_form(), diffusion, sampler=sampler,
                              cfg_scale=cfg_scale, vae=vae, mesh=mesh)


def run_sampling_job(export_dir, out_dir, *, num_images: int | None = None,
                     classes: Sequence[int] | None = None, per_class: int = 1, seed: int = 0,
                     sampler: str = "ddpm", steps: str | None = None, cfg_scale: float = 1.0,
                     guide_all_channels: bool = False, per_device_batch: int = 32,
                     write_png: bool = True, vae_weights: str | None = None,
                     max_batches: int | None = None, mesh=None,
                     dtype: str | None = None) -> dict[str, Any]:
    """Samples a job's images into out_dir, resuming whatever an earlier run left there.

    Either `classes` (each repeated per_class times: a grid with one row per class) or
    `num_images` with uniformly random classes drawn from the seed. steps: the timestep
    respacing ("250", "ddim50", "20"; default per sampler). Every process calls this; each
    writes the images its devices made. max_batches: stop after that many batches (the
    rest is sampled by the next run). dtype: the model's compute dtype (default: the export's,
    i.e. the training dtype; evaluation samples in float32). Returns {"out_dir", "num_images", "finished",
    "npz", "grid"} (npz and grid are None until every image is done).
    """
    from udit_jax import diffusion as diffusion_lib
    from udit_jax import export, parallel
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; use one of {SAMPLERS}")
    if (classes is None) == (num_images is None or num_images <= 0):
        raise ValueError("give either classes (a class grid) or num_images > 0 (random classes)")
    if per_device_batch < 1 or per_class < 1:
        raise ValueError(f"per_device_batch={per_device_batch} and per_class={per_class} must be >= 1")
    steps = str(steps or DEFAULT_STEPS[sampler])
    info = export.read_info(export_dir)
    num_classes = info["data"]["num_classes"]
    if classes is not None:
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("classes is empty; list the class ids of the grid rows")
        labels = np.repeat(np.asarray(classes, np.int32), per_class)
        num_images = len(labels)
    else:
        labels = random_labels(seed, num_images, num_classes)
    _check_labels(labels, num_classes)
    _check_cfg_scale(cfg_scale)
    if cfg_scale <= 1.0 and jax.process_index() == 0:
        from absl import logging
        logging.info("cfg_scale=%g: no classifier-free guidance is applied (the official scripts "
                     "guide only above 1)", cfg_scale)
    latent = info["data"]["space"] == "latent"
    vae_weights = _vae_weights_file(info, vae_weights) if latent else None
    dtype = str(jnp.dtype(dtype or info["model"]["dtype"]))
    guided = info["model"]["kwargs"].get("cfg_channels", 3)
    spec = {"export_dir": str(export_dir), "export_created": info["metadata"].get("created"),
            "export_config_hash": info["metadata"].get("config_hash"),
            "export_weights_sha256": info["metadata"].get("weights_sha256"),
            "vae_weights_sha256": _weights_sha256(vae_weights) if latent else None,
            "dtype": dtype, "seed": int(seed), "sampler": sampler, "steps": steps,
            "cfg_scale": float(cfg_scale), "guide_all_channels": bool(guide_all_channels),
            "cfg_channels": None if guide_all_channels or cfg_scale <= 1 else guided,
            "num_images": int(num_images),
            "labels": "random" if classes is None else {"classes": classes, "per_class": per_class}}
    diffusion_lib.create_diffusion(steps, **info["diffusion"])   # a bad `steps` fails here
    out_dir = epath.Path(out_dir)
    _check_spec(out_dir / "job.json", spec)
    mesh = parallel.make_mesh() if mesh is None else mesh
    vae_params = _load_vae_params(info, vae_weights, mesh) if latent else None
    model, params, _ = export.load_export(export_dir, mesh=mesh, dtype=dtype)
    check_settings(model, sampler, cfg_scale)
    _, params = inference_model(model, params)
    fn = _job_sampler(json.dumps(info["model"], sort_keys=True), bool(guide_all_channels),
                      json.dumps(info["diffusion"], sort_keys=True), steps, sampler,
                      float(cfg_scale), json.dumps(_vae_arguments(info)) if latent else None, mesh,
                      dtype)

    parts_dir = out_dir / "parts"
    if jax.process_index() == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
        if write_png:
            (out_dir / "images").mkdir(exist_ok=True)
        if not (out_dir / "job.json").exists():
            _write_atomic(out_dir / "job.json", json.dumps(spec, indent=2).encode())
    _barrier("sample_job_dirs")
    todo = np.flatnonzero(~_finished_indices(parts_dir, num_images)).astype(np.int32)
    batch = per_device_batch * mesh.size
    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)][:max_batches]
    key = noise_key(seed)
    bar = _progress(num_images, num_images - len(todo), sampler, steps, cfg_scale)

    def finish(chunk: np.ndarray, images: jax.Array) -> None:
        rows, local = _local_rows(images)
        valid = rows < len(chunk)
        rows, local = rows[valid], quantize(local[valid])
        if len(rows):
            indices = chunk[rows]
            if write_png:
                # PNG encoding (zlib) releases the GIL: threads keep pace with fast samplers.
                list(png_writers.map(lambda i, x: (out_dir / "images" / f"{i:06d}.png").write_bytes(
                    _png_bytes(x)), indices, local))
            # The part file is written last: it marks these images as finished.
            _write_atomic(parts_dir / f"part_{indices[0]:09d}.npz",
                          _npz_bytes(images=local, labels=labels[indices], indices=indices))
        if bar is not None:
            bar.update(len(chunk))

    png_writers = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    pending = None   # the previous batch is written while the device computes the next
    for chunk in batches:
        images = fn(params, vae_params, key, _global_array(mesh, _pad(chunk, batch, num_images)),
                    _global_array(mesh, _pad(labels[chunk], batch, 0)))
        if pending is not None:
            finish(*pending)
        pending = (chunk, images)
    if pending is not None:
        finish(*pending)
    png_writers.shutdown()
    if bar is not None:
        bar.close()
    _barrier("sample_job_parts")
    finished = len(batches) * batch >= len(todo)
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
    sample.classes x sample.per_class; N: N images of random classes), sample.sampler,
    sample.steps, sample.cfg_scale, sample.guide_all_channels, sample.seed,
    sample.per_device_batch, sample.write_png, sample.out_dir, vae.weights (latent models;
    default: the weights recorded in the export).
    """
    s = dict(job_config_defaults())
    s.update(dict(config.sample))
    workdir = epath.Path(workdir)
    export_dir = epath.Path(s["export_dir"]) if s["export_dir"] else workdir / "export"
    grid = not s["num_images"]
    tag = (f"{s['sampler']}-{s['steps']}-cfg{float(s['cfg_scale']):g}-seed{s['seed']}-"
           + ("grid" if grid else str(s["num_images"])))
    out_dir = epath.Path(s["out_dir"]) if s["out_dir"] else workdir / "samples" / tag
    vae_weights = config.get("vae", {}).get("weights") if config.get("vae") else None
    result = run_sampling_job(
        export_dir, out_dir, num_images=None if grid else int(s["num_images"]),
        classes=list(s["classes"]) if grid else None, per_class=int(s["per_class"]),
        seed=int(s["seed"]), sampler=s["sampler"], steps=str(s["steps"]),
        cfg_scale=float(s["cfg_scale"]), guide_all_channels=bool(s["guide_all_channels"]),
        per_device_batch=int(s["per_device_batch"]), write_png=bool(s["write_png"]),
        vae_weights=vae_weights or None)
    if jax.process_index() == 0:
        from absl import logging
        logging.info("sampled %d images into %s (%s)", result["num_images"], out_dir, result["npz"])
    return result
