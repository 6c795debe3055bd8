"""The one sampler: guided, per-image noise keys, sharded over a mesh; images, grids, PNGs.

    from udit_jax import diffusion, export, sampler
    model, params, info = export.load_export("runs/demo/export")
    d = diffusion.create_diffusion("ddim50", **info["diffusion"])
    x = sampler.sample_images(model, params, d, labels, sampler.noise_key(0), cfg_scale=4.0,
                              sampler="ddim")                 # float [N, H, W, C], about [-1, 1]
    images = sampler.quantize(x)                               # uint8, as the official sample_ddp.py

Training previews, in-loop evaluation, `--mode=sample` and `--mode=evaluate` all sample
through `Sampler` here; they differ only in where images go.

Samplers (SAMPLERS, name -> objective, loop and default steps). For models trained with
DDPM's objective, the process is a GaussianDiffusion respaced to the steps: "ddpm"
(ancestral with the learned variance, the papers' 250 respaced steps), "ddim" (eta = 0;
"ddim50") and "dpm" (DPM-Solver++(2M), 20 steps). For transport-trained (SiT) models the
process is the transport sampling function with `steps` time-grid points
(transport_process): "ode" (probability flow) and "sde", 250 points as SiT's sample.py.
Adding a sampler is an entry in SAMPLERS.

Guidance: with cfg_scale > 1 each image's conditional and unconditional rows run in one
model batch and are mixed as the official forward_with_cfg does (the model's `cfg_channels`
guided, the rest conditional; model.clone(cfg_channels=None) guides every channel), at
noise levels inside `guidance_interval` only (diffusion.guidance: (0, 1) everywhere, an
empty interval nowhere). Models run in their inference form (U-DiT's FFNs fused, as the
official code samples after `.eval()`): pass training-form params, the fusion happens here.
Latent models are decoded with the SD VAE; pixel models are not, and DDPM's x_0 predictions
are clipped to [-1, 1] for them.

Determinism: image i starts from noise drawn with fold_in(fold_in(key, i), 0) and takes its
step-t noise from fold_in(fold_in(key, i), t + 1) (t: the DDPM step index, or the SDE's step
number), so an image depends on the key, its index, its label and the settings only: the
same on 1 or on 256 devices, in any batch.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from udit_jax import parallel
from udit_jax.diffusion import guidance, transport
from udit_jax.diffusion.gaussian import GaussianDiffusion
from udit_jax.models.layers import forms_for, guided_output
from udit_jax.models.udit import fuse_ffn_params
from udit_jax.models.vae import decode_latents


# ========================================================================================
# The registry: sampler name -> loop and default steps.

@dataclasses.dataclass(frozen=True)
class Loop:
    """One sampler: the models it samples and how it runs.

    objective: "ddpm" (process: a GaussianDiffusion) or "transport" (process: a
    transport.SamplingFn). run(process, model_fn, x_T, step_noise_fn, clip_denoised,
    model_kwargs) -> x_0.
    """
    objective: str
    run: Callable
    default_steps: str   # the respacing (DDPM) or time-grid points (transport) by default


def _transport_run(fn, f, x, noise_fn, clip, kw):
    del clip   # SiT's samplers return the final state as it is
    if fn.stochastic:
        return fn.final(x, f, noise_fn=noise_fn, **kw)
    return fn.final(x, f, **kw)


SAMPLERS: dict[str, Loop] = {
    "ddpm": Loop("ddpm", lambda d, f, x, noise_fn, clip, kw: d.p_sample_loop(
        f, x.shape, noise=x, step_noise_fn=noise_fn, clip_denoised=clip, model_kwargs=kw), "250"),
    "ddim": Loop("ddpm", lambda d, f, x, noise_fn, clip, kw: d.ddim_sample_loop(
        f, x.shape, noise=x, clip_denoised=clip, model_kwargs=kw), "ddim50"),
    "dpm": Loop("ddpm", lambda d, f, x, noise_fn, clip, kw: d.dpm_solver_sample_loop(
        f, x.shape, noise=x, clip_denoised=clip, model_kwargs=kw), "20"),
    "ode": Loop("transport", _transport_run, "250"),
    "sde": Loop("transport", _transport_run, "250"),
}


def default_steps(sampler: str) -> str:
    check_sampler(sampler)
    return SAMPLERS[sampler].default_steps


def samplers_of(objective: str) -> tuple[str, ...]:
    return tuple(name for name, loop in SAMPLERS.items() if loop.objective == objective)


def check_sampler(sampler: str, objective: str | None = None, what: str = "sampler") -> None:
    """ValueError unless `sampler` is known and (objective given) samples models trained
    with `objective` ("ddpm" or "transport", e.g. an export's)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"{what}={sampler!r}; use one of {samplers_of('ddpm')} (objective "
                         f"'ddpm') or {samplers_of('transport')} (objective 'transport')")
    if objective is not None and SAMPLERS[sampler].objective != objective:
        raise ValueError(f"{what}={sampler!r} samples '{SAMPLERS[sampler].objective}' models, "
                         f"but this model was trained with objective={objective!r}; use one of "
                         f"{samplers_of(objective)}")


def check_process(sampler: str, process) -> None:
    """ValueError unless `process` is what `sampler` integrates."""
    check_sampler(sampler)
    if SAMPLERS[sampler].objective == "ddpm":
        if not isinstance(process, GaussianDiffusion):
            raise ValueError(f"sampler={sampler!r} runs a GaussianDiffusion "
                             f"(diffusion.create_diffusion(steps)), got {type(process).__name__}")
    elif not (isinstance(process, transport.SamplingFn) and process.stochastic == (sampler == "sde")):
        raise ValueError(f"sampler={sampler!r} runs a transport sampling function "
                         f"(transport_process(..., {sampler!r}, ...)), got {process!r}")


def transport_process(transport_arguments: dict, sampler: str, steps,
                      options: dict | None = None) -> transport.SamplingFn:
    """SiT's sampling function for sampler "ode" or "sde" with `steps` time-grid points (SiT's
    num_sampling_steps) of create_transport(**transport_arguments) (an export's
    info["objective"]["transport"]). options: sample_ode's (sampling_method, atol, rtol) or
    sample_sde's (sampling_method, diffusion_form, diffusion_norm, last_step,
    last_step_size) keyword arguments; the library's defaults where missing."""
    check_sampler(sampler, "transport")
    try:
        num_steps = int(steps)
    except (TypeError, ValueError):
        raise ValueError(f"steps={steps!r}: transport samplers take a number of time-grid "
                         "points such as 250") from None
    s = transport.Sampler(transport.create_transport(**transport_arguments))
    if sampler == "ode":
        return s.sample_ode(num_steps=num_steps, **(options or {}))
    return s.sample_sde(num_steps=num_steps, **(options or {}))


def model_noise_level(process) -> Callable:
    """u(t) (0 data, 1 noise) of the time the process's loops give the model: the original
    DDPM step t / T, or 1 - SiT's time."""
    if isinstance(process, transport.SamplingFn):
        return guidance.transport_noise_level
    return guidance.ddpm_noise_level(process.original_num_steps)


def check_settings(model, sampler: str, cfg_scale: float) -> None:
    check_sampler(sampler)
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale={cfg_scale} must be finite and >= 0 (up to 1: no guidance; "
                         "the papers guide with 1.5 or 4)")
    if cfg_scale > 1.0 and not model.class_dropout_prob > 0:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional (null class) embedding, "
                         "which models trained with class_dropout_prob=0 lack; use cfg_scale=1")


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"class labels {sorted(set(bad.tolist()))[:10]} are outside [0, "
                         f"{num_classes}) of this model")


# ========================================================================================
# Keys and labels.

def noise_key(seed: int) -> jax.Array:
    """The key whose fold_in(., i) gives image i's noise for this seed."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def random_labels(seed: int, num_images: int, num_classes: int) -> np.ndarray:
    """Uniform class labels [num_images] int32; label i depends on (seed, i) only."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    draw = jax.jit(jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0,
                                                         num_classes)))
    return np.asarray(draw(jnp.arange(num_images, dtype=jnp.int32)), np.int32)


# ========================================================================================
# The sampling computation.

def inference_form(model) -> tuple[object, Callable]:
    """(the model as run for sampling, params transform from training-form params).

    U-DiT's re-parameterisable FFNs are fused (fuse_ffn_params); other models and models
    already in inference form are unchanged. The one place sampling fuses FFNs.
    """
    if getattr(model, "has_rep_ffn", False) and not model.fused_ffn:
        return model.inference_form(), fuse_ffn_params
    return model, lambda params: params


def guided_model_fn(model, params, cfg_scale: float, interval=(0.0, 1.0),
                    noise_level: Callable | None = None) -> Callable:
    """model_fn(x [n, H, W, C], t [n], y [n]) -> [n, H, W, C_out], guided when cfg_scale > 1.

    The guided output of each image is the official forward_with_cfg's first half. Each
    image's conditional and unconditional rows sit next to each other in the model batch, so
    a batch sharded over devices stays where it is ([cond; uncond] halves would move rows
    between devices). Each image is guided with cfg_scale where noise_level(t) lies in
    `interval`, with scale 1 elsewhere (guidance.guidance_scale); an empty interval runs the
    model unguided (no unconditional rows).
    """
    low, high = guidance.check_interval(interval)
    if cfg_scale <= 1.0 or low > high:
        return lambda x, t, y: model.apply({"params": params}, x, t, y)

    def model_fn(x, t, y):
        n = x.shape[0]
        pair = lambda a: jnp.repeat(a, 2, axis=0)   # [a0, a0, a1, a1, ...]  # noqa: E731
        y_pair = jnp.stack([y, jnp.full_like(y, model.num_classes)], axis=1).reshape(-1)
        out = model.apply({"params": params}, pair(x), pair(t), y_pair)
        out = out.reshape((n, 2) + out.shape[1:])
        scale = guidance.guidance_scale(cfg_scale, noise_level(t), (low, high))   # [n]
        return jax.vmap(lambda o, s: guided_output(o, s, model.cfg_channels)[0])(out, scale)

    return model_fn


def make_batch_sampler(model, process, *, sampler: str = "ddpm", cfg_scale: float = 1.0,
                       guidance_interval=(0.0, 1.0), vae=None, mesh=None,
                       clip_denoised: bool | None = None) -> Callable:
    """A jitted fn(params, vae_params, key, indices [B], labels [B]) -> images [B, H, W, C].

    process: what `sampler` integrates (see Sampler). params: training- or inference-form
    params of `model`. indices: the images' indices (their noise comes from fold_in(key,
    index)); labels: their classes. The output is float32, decoded with `vae` (vae_params)
    for latent models, about [-1, 1], not clipped; sharded over the batch when a mesh is
    given. clip_denoised (DDPM samplers) defaults to pixel space.
    """
    check_settings(model, sampler, cfg_scale)
    check_process(sampler, process)
    noise_level = model_noise_level(process)
    model, to_inference = inference_form(model)
    clip = vae is None if clip_denoised is None else clip_denoised
    sample_shape = (model.input_size, model.input_size, model.in_channels)
    loop = SAMPLERS[sampler]

    def per_image_normal(keys, salt):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), sample_shape,
                                                    jnp.float32))(keys)

    def sample(params, vae_params, key, indices, labels):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
        model_fn = guided_model_fn(model, to_inference(params), cfg_scale, guidance_interval,
                                   noise_level)
        with forms_for(*parallel.forms_device(mesh)):   # this platform's (chip's) forms, as training
            x = loop.run(process, model_fn, per_image_normal(keys, 0),
                         lambda t: per_image_normal(keys, t + 1), clip, {"y": labels})
        return x if vae is None else decode_latents(vae, vae_params, x)

    if mesh is None:
        return jax.jit(sample)
    return jax.jit(sample, out_shardings=parallel.batch_sharding(mesh, 4))


def _global_array(mesh, host: np.ndarray) -> jax.Array:
    """A batch-sharded global array from a host array every process holds in full."""
    sharding = parallel.batch_sharding(mesh, host.ndim)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros(size - len(x), x.dtype)]) if len(x) < size else x


def _gather(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Sampler:
    """A compiled sampler of one model, process and setting, sharded over `mesh`.

    model: training or inference form. process: what the sampler integrates: for "ddpm",
    "ddim", "dpm" a diffusion respaced to the steps, e.g. create_diffusion("250"),
    ("ddim50"), ("20"); for "ode", "sde" the transport sampling function,
    transport_process(info["objective"]["transport"], "ode", 250). guidance_interval: the
    noise levels (0 data, 1 noise) where cfg_scale applies. vae: decodes latents (latent
    models). mesh: each device samples its share of every batch (default: all devices, data
    parallel).
    """

    def __init__(self, model, process, *, sampler: str = "ddpm", cfg_scale: float = 1.0,
                 guidance_interval=(0.0, 1.0), vae=None, mesh=None,
                 clip_denoised: bool | None = None):
        self.model = model
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        if 0 <= cfg_scale < 1.0 and jax.process_index() == 0:
            logging.info("cfg_scale=%g: no classifier-free guidance is applied (guidance starts "
                         "above 1, as in the official scripts)", cfg_scale)
        self.fn = make_batch_sampler(model, process, sampler=sampler, cfg_scale=cfg_scale,
                                     guidance_interval=guidance_interval, vae=vae,
                                     mesh=self.mesh, clip_denoised=clip_denoised)

    def batches(self, params, vae_params, key, labels: np.ndarray, indices: np.ndarray,
                batch: int) -> Iterator[tuple[np.ndarray, jax.Array]]:
        """(positions [b] into labels/indices, images [batch, H, W, C] batch-sharded) per batch.

        `batch` is rounded up to the data-parallel device count; the last batch is padded (rows past b are
        padding). The next batch is dispatched before a batch is handed out, so the caller's
        I/O overlaps the device's work.
        """
        labels, indices = np.asarray(labels, np.int32), np.asarray(indices, np.int32)
        check_labels(labels, self.model.num_classes)
        if indices.shape != labels.shape:
            raise ValueError(f"indices has shape {indices.shape}, labels {labels.shape}")
        ways = parallel.batch_ways(self.mesh)
        batch = -(-batch // ways) * ways
        pending = None
        for start in range(0, len(labels), batch):
            rows = np.arange(start, min(start + batch, len(labels)))
            images = self.fn(params, vae_params, key,
                             _global_array(self.mesh, _pad(indices[rows], batch)),
                             _global_array(self.mesh, _pad(labels[rows], batch)))
            if pending is not None:
                yield pending
            pending = (rows, images)
        if pending is not None:
            yield pending

    def host_batches(self, params, vae_params, key, labels: np.ndarray, indices: np.ndarray,
                     batch: int) -> Iterator[np.ndarray]:
        """float32 [b, H, W, C] per batch, padding dropped, on every process."""
        for rows, images in self.batches(params, vae_params, key, labels, indices, batch):
            yield _gather(images)[:len(rows)]

    def __call__(self, params, key, labels, *, vae_params=None,
                 indices: Sequence[int] | None = None, batch_size: int | None = None) -> np.ndarray:
        """float32 [N, H, W, C] images of `labels` (every process gets all of them)."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        indices = np.arange(len(labels), dtype=np.int32) if indices is None else indices
        return np.concatenate(list(self.host_batches(params, vae_params, key, labels, indices,
                                                     batch_size or len(labels))))


def sample_images(model, params, process, labels, key, *, cfg_scale: float = 1.0,
                  sampler: str = "ddpm", guidance_interval=(0.0, 1.0), vae=None,
                  vae_params=None, mesh=None, indices: Sequence[int] | None = None,
                  batch_size: int | None = None, clip_denoised: bool | None = None) -> np.ndarray:
    """Samples one image per label with a one-off Sampler; float32 [N, H, W, C], about [-1, 1].

    key: image j's noise comes from fold_in(key, indices[j]) (indices default 0..N-1).
    batch_size: images per call (default all, rounded up to the device count).
    """
    s = Sampler(model, process, sampler=sampler, cfg_scale=cfg_scale,
                guidance_interval=guidance_interval, vae=vae, mesh=mesh,
                clip_denoised=clip_denoised)
    params = jax.device_put(params, parallel.replicated(s.mesh))
    if vae_params is not None:
        vae_params = jax.device_put(vae_params, parallel.replicated(s.mesh))
    return s(params, key, labels, vae_params=vae_params, indices=indices, batch_size=batch_size)


def check_vae_weights(weights: str | None) -> None:
    """ValueError / FileNotFoundError unless `weights` names an SD VAE weights file."""
    if not weights:
        raise ValueError("this is a latent-space model: set the SD VAE weights (config.vae.weights, "
                         "or vae_weights=), e.g. sd-vae-ft-ema's diffusion_pytorch_model.safetensors")
    if not epath.Path(weights).is_file():
        raise FileNotFoundError(f"VAE weights not found: {weights}; set config.vae.weights "
                                "(vae_weights=) to the SD VAE weights file")


def load_vae(arguments: dict, weights: str, mesh):
    """(vae, params replicated on mesh) of the SD VAE described by `arguments` (build_vae's,
    with scaling_factor) from a weights file."""
    from udit_jax import models
    from udit_jax.convert.vae import load_vae_params
    check_vae_weights(weights)
    vae = models.build_vae(**arguments)
    return vae, jax.device_put(load_vae_params(vae, weights), parallel.replicated(mesh))


# ========================================================================================
# Images: quantisation, grids, PNG.

def quantize(images: np.ndarray) -> np.ndarray:
    """uint8 images as the official scripts store them: clip(127.5 x + 128, 0, 255), truncated."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """[rows * H, columns * W, C] from images [n, H, W, C] filled row by row (blank padding)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, h, w, c), images.dtype)
    padded[:n] = images
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of a uint8 [H, W, C] image (C = 1 is written as grayscale)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, image: np.ndarray) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
