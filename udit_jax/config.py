"""The config schema and everything derived from a config.

    config = config_lib.base_config()        # every field, with the official recipe's defaults
    config = config_lib.imagenet_config("U-DiT-B")
    model = config_lib.build_model(config)

Every `configs/*.py` starts from `base_config()` or `imagenet_config()`; the jobs (train,
export, sample, evaluate) read what a config means from here, never from each other.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import optax

# ========================================================================================
# Config schema (every configs/*.py starts from this and overrides what it needs).

def base_config() -> ml_collections.ConfigDict:
    """All fields a training config has, with the official DiT/U-DiT recipe as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256                # global, across all devices and processes
    c.total_steps = 400_000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.sample_every_steps = 20_000     # EMA sample grid; 0 disables
    c.eval_every_steps = 0            # in-loop evaluation (udit_jax.evaluation); 0 disables

    c.model = ml_collections.ConfigDict()
    c.model.name = "U-DiT-B"          # a registry name or the family "DiT" / "U-DiT"
    c.model.dtype = "float32"         # compute dtype; params and optimizer state stay float32
    c.model.remat = False             # rematerialise each block in the backward pass
    # Constructor overrides (official argument names). input_size, in_channels and
    # num_classes default to what the data implies.
    c.model.kwargs = ml_collections.ConfigDict()

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.noise_schedule = "linear"
    c.diffusion.diffusion_steps = 1000
    c.diffusion.learn_sigma = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.warmup_steps = 0      # linear warmup from 0; 0 = constant lr (official)
    c.optimizer.grad_clip_norm = 0.0  # 0 = off (official)
    c.optimizer.grad_accum_steps = 1  # microbatches per step (same update, less memory)
    c.optimizer.ema_decay = 0.9999
    c.optimizer.skip_nonfinite = False  # True: skip NaN/Inf updates instead of stopping

    # Input pipeline (udit_jax.data reads the fields it documents; these are the common ones).
    c.data = ml_collections.ConfigDict()
    c.data.space = "latent"           # "latent" (VAE cache: {mean, std, label}) or "pixel"
    c.data.source = "tfds"            # folder | tfds | fashion_mnist | synthetic (tests, benchmarks)
    c.data.tfds_name = "imagenet2012"
    c.data.dir = ""                   # source location (class folders, tfds data_dir, ...)
    c.data.split = "train"
    c.data.cache_dir = ""             # latent cache; "" = <workdir>/latents (--mode=encode fills it)
    c.data.image_size = 256           # pixels; the model sees image_size // 8 for latents
    c.data.channels = 3               # pixel channels (latents always have 4)
    c.data.num_classes = 1000
    c.data.latent_scale = 0.18215     # SD-VAE scaling factor
    c.data.random_flip = True
    c.data.loader_threads = 8
    c.data.prefetch_batches = 4
    c.data.loader_workers = 0         # grain worker processes (0: threads only)
    c.data.decode_threads = 0         # image decoding threads (0: the data module's default)
    c.data.min_image_side = 16        # smaller images are skipped as unusable
    c.data.max_image_pixels = 2 ** 27
    c.data.max_bad_fraction = 0.001   # unreadable images tolerated before failing
    c.data.cache_dtype = "float16"    # latent cache (--mode=encode)
    c.data.encode_batch_size = 64     # per process
    c.data.records_per_shard = 4096

    # The SD VAE: encodes the latent cache (--mode=encode) and decodes latent previews.
    c.vae = ml_collections.ConfigDict()
    c.vae.weights = ""                # e.g. sd-vae-ft-ema's diffusion_pytorch_model.safetensors
    c.vae.arguments = ml_collections.ConfigDict()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.rules = "data_parallel"    # or "fsdp", or [(logical axis, mesh axis), ...]
    c.mesh.cpu_devices = 0            # CPU hosts: N XLA devices sharing the batch (-1: one per
                                      # core); 0: one device using intra-op threads

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3             # the last N checkpoints ...
    c.checkpoint.keep_every = 50_000  # ... plus every K-th step (0: none)
    c.checkpoint.async_save = True

    c.sample = ml_collections.ConfigDict()
    c.sample.classes = [88, 207, 279, 360, 387, 388, 417, 980]  # rows of the preview grid
    c.sample.per_class = 8
    c.sample.sampler = "ddpm"         # "ddpm", "ddim" or "dpm" (DPM-Solver++, ~20 steps)
    c.sample.steps = "250"            # timestep respacing of the preview sampler
    c.sample.cfg_scale = 4.0
    c.sample.seed = 0                 # fixed noise: grids are comparable across steps
    # Sampling jobs (--mode=sample, udit_jax.sample) from an export.
    c.sample.num_images = 0           # 0: the class grid (classes x per_class); N: N random classes
    c.sample.per_device_batch = 32
    c.sample.export_dir = ""          # "" = <workdir>/export
    c.sample.out_dir = ""             # "" = <workdir>/samples/<sampler>-<steps>-cfg<s>-seed<k>-<N>
    c.sample.write_png = True
    c.sample.guide_all_channels = False  # CFG on every output channel instead of the official 3

    # --mode=export (udit_jax.export): EMA params of a checkpoint for sampling jobs.
    c.export = ml_collections.ConfigDict()
    c.export.dir = ""                 # "" = <workdir>/export
    c.export.step = 0                 # 0 = the latest checkpoint
    c.export.torch_weights = False    # also write the official PyTorch state_dict

    # FID / sFID / IS of EMA samples (udit_jax.evaluation): in the loop every eval_every_steps
    # with the preview sampler's settings, and for --mode=evaluate on a sample .npz.
    c.eval = ml_collections.ConfigDict()
    c.eval.reference_npz = ""         # ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
    c.eval.inception_weights = ""     # pytorch-fid Inception weights
    c.eval.sample_npz = ""            # --mode=evaluate: the samples to score
    c.eval.output_json = ""           # --mode=evaluate: "" = <workdir>/eval/<sample>.json
    c.eval.num_samples = 5000         # in-loop samples
    c.eval.sample_batch = 256
    c.eval.batch_size = 256           # Inception batch
    c.eval.is_split_size = 5000
    c.eval.preprocess = "adm"
    c.eval.fid_method = "sqrtm"
    c.eval.pr_distance = "float16"
    c.eval.dtype = "float32"
    c.eval.seed = 0
    # --mode=evaluate of an export (when sample_npz is ""): sample num_samples images first;
    # sampler/steps/cfg_scale "" or None fall back to config.sample's values.
    c.eval.export_dir = ""            # "" = <workdir>/export
    c.eval.sampler = ""
    c.eval.steps = ""
    c.eval.cfg_scale = ml_collections.config_dict.placeholder(float)
    # --mode=evaluate writing reference statistics of config.data instead of scoring.
    c.eval.write_reference_to = ""
    # "fashion_mnist": score preview grids and --mode=evaluate samples with the project's
    # Fashion-MNIST classifier (recognised %, Frechet distance; evaluation.fashion_mnist_quality).
    c.eval.quality = ""
    c.eval.reference_max_images = 0  # 0 = every image
    c.eval.reference_with_images = False
    return c


def imagenet_config(model_name: str, image_size: int = 256) -> ml_collections.ConfigDict:
    """The official DiT / U-DiT ImageNet recipe on SD-VAE latents (the configs/ files use it).

    AdamW lr 1e-4, weight decay 0, global batch 256, EMA 0.9999, label dropout 0.1, 400K
    steps, seed 0 (base_config's defaults), ImageNet from tfds at `image_size`, bfloat16
    compute with float32 params and optimizer state.
    """
    config = base_config()
    config.model.name = model_name
    config.model.dtype = "bfloat16"
    config.data.space = "latent"
    config.data.source = "tfds"
    config.data.tfds_name = "imagenet2012"
    config.data.image_size = image_size
    config.data.num_classes = 1000
    config.batch_size = 256
    config.total_steps = 400_000
    config.seed = 0
    return config


def is_latent(config) -> bool:
    if config.data.space not in ("latent", "pixel"):
        raise ValueError(f"data.space={config.data.space!r}; use 'latent' or 'pixel'")
    return config.data.space == "latent"


def model_kwargs(config) -> dict[str, Any]:
    latent = is_latent(config)
    kwargs = dict(config.model.kwargs)
    if latent and config.data.image_size % 8:
        raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of 8, the "
                         "VAE's downsampling factor")
    kwargs.setdefault("input_size", config.data.image_size // 8 if latent else config.data.image_size)
    kwargs.setdefault("in_channels", 4 if latent else config.data.channels)
    kwargs.setdefault("num_classes", config.data.num_classes)
    kwargs.setdefault("learn_sigma", config.diffusion.learn_sigma)
    if kwargs["in_channels"] < 3:
        # The official CFG guides channels 0-2 only; with fewer channels guide them all.
        kwargs.setdefault("cfg_channels", None)
    kwargs["dtype"] = jnp.dtype(config.model.dtype)
    kwargs["remat"] = bool(config.model.remat)
    return kwargs


def build_model(config):
    """The model the config describes; ValueError naming the problem when it cannot exist."""
    from udit_jax import models
    kwargs = model_kwargs(config)
    try:
        return models.build_model(config.model.name, **kwargs)
    except ValueError as e:
        raise ValueError(f"model.name={config.model.name!r} with {kwargs}: {e}") from e


def make_optimizer(opt) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (optionally warmup and global-norm clipping) and its learning-rate schedule."""
    if opt.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
    else:
        schedule = optax.constant_schedule(opt.learning_rate)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw), schedule
    return adamw, schedule


def make_diffusion(config):
    from udit_jax import diffusion
    return diffusion.create_diffusion("", noise_schedule=config.diffusion.noise_schedule,
                                      learn_sigma=config.diffusion.learn_sigma,
                                      diffusion_steps=config.diffusion.diffusion_steps)
