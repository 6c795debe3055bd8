"""The config schema and everything derived from a config.

    config = config_lib.base_config()        # every field, with the official recipe's defaults
    config = config_lib.imagenet_config("U-DiT-B")
    model = config_lib.build_model(config)

Every `configs/*.py` starts from `base_config()` or `imagenet_config()`; the jobs (train,
export, sample, evaluate) read what a config means from here, never from each other:
`validate(config)` checks everything that can be checked before compiling, and the
functions below it compute each derived value (model, diffusion, mesh, VAE description,
sampling settings) in one place. Every field has its default in the schema; code reads
fields, never `.get(name, default)`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from udit_jax import diffusion as diffusion_lib
from udit_jax import models, parallel
from udit_jax.diffusion import guidance
from udit_jax.models.layers import MATMUL_PRECISIONS, REMAT_KEEPS
from udit_jax import sampler as sampler_lib

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
    c.model.matmul_precision = ml_collections.config_dict.placeholder(str)
                                      # the model's matmuls: None (JAX's default: float32 on
                                      # CPUs, one bfloat16 pass on TPUs, TF32 on GPUs),
                                      # 'bfloat16' (that default, and on CPUs one bfloat16
                                      # pass: several times faster on bfloat16 units) or
                                      # 'float32' (full float32 everywhere)
    c.model.remat = False             # rematerialise each block in the backward pass
    c.model.remat_keeps = "outputs"   # what remat keeps: outputs | attention | inputs (least memory)
    c.model.scan_blocks = False       # U-DiT: each stage's blocks as one scan (compiles faster,
                                      # runs slower); a run may switch on resume
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
    c.data.decode_threads = 8         # image decoding threads (pixel loader, --mode=encode)
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

    # Mesh axes are data (MaxText-style): `axes` names them, outermost first, and each has a
    # size field here. A third axis is config: axes=("data", "fsdp", "tensor"), tensor=2 and
    # rules mapping parameter axes to it (the batch is split over data and fsdp only).
    # Not type-safe: `rules` is a preset name or a list of pairs.
    c.mesh = ml_collections.ConfigDict(type_safe=False)
    c.mesh.axes = ("data", "fsdp")
    c.mesh.data = -1                  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.rules = "data_parallel"    # or "fsdp", or [(logical axis, mesh axis), ...]
    c.mesh.shard_update = False       # True: optimizer state and EMA split over the data axes
                                      # (ZeRO-1): each device updates 1/N of every parameter
    c.mesh.cpu_devices = 0            # CPU hosts: N XLA devices sharing the batch (-1: one per
                                      # core); 0: one device using intra-op threads

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3             # the last N checkpoints ...
    c.checkpoint.keep_every = 50_000  # ... plus every K-th step (0: none)
    c.checkpoint.async_save = True
    # When the workdir's checkpoints do not fit this config, or none can be read: "stop"
    # (default, says what differs), or an explicit opt-in, both keeping the old checkpoints in
    # <workdir>/checkpoints_set_aside: "start_fresh" (step 0) or "load_params" (fine-tune:
    # their params and EMA, fresh optimizer and data state, step 0).
    c.checkpoint.on_mismatch = "stop"

    c.sample = ml_collections.ConfigDict()
    # Rows of the preview grid. A tuple, so the command line can override it
    # (--config.sample.classes=0,1,2); configs may assign lists (stored as tuples).
    c.sample.classes = (88, 207, 279, 360, 387, 388, 417, 980)
    c.sample.per_class = 8
    c.sample.sampler = "ddpm"         # "ddpm", "ddim" or "dpm" (DPM-Solver++, ~20 steps);
                                      # "ode" or "sde" for objective="transport"
    c.sample.steps = ""               # timestep respacing (transport: time-grid points); "" =
                                      # the sampler's default (udit_jax.sampler.SAMPLERS:
                                      # ddpm 250, ddim ddim50, dpm 20, ode 250, sde 250)
    c.sample.cfg_scale = 4.0          # guidance above 1 only (official); < 0 is refused
    c.sample.seed = 0                 # fixed noise: grids are comparable across steps
    # Sampling jobs (--mode=sample, udit_jax.sample) from an export.
    c.sample.num_images = 0           # 0: the class grid (classes x per_class); N: N random classes
    c.sample.per_device_batch = 32
    c.sample.export_dir = ""          # "" = <workdir>/export
    c.sample.out_dir = ""             # "" = <workdir>/samples/<config.sampling_tag>-<grid{classes}x{per_class} or N>
    c.sample.write_png = True
    c.sample.guide_all_channels = False  # CFG on every output channel instead of the official 3

    # --mode=export (udit_jax.export): EMA params of a checkpoint for sampling jobs.
    c.export = ml_collections.ConfigDict()
    c.export.dir = ""                 # "" = <workdir>/export
    c.export.step = 0                 # 0 = the latest checkpoint
    c.export.torch_weights = False    # also write the official PyTorch state_dict

    # --mode=compile (udit_jax.compile): the train step compiled for a TPU topology on any host
    # (needs `pip install 'udit-jax[tpu]'`): HBM per chip, compile time, the cost model's step time.
    c.compile = ml_collections.ConfigDict()
    c.compile.topology = ""           # "v5p-8", "v5e-16" / "v5litepod-16", "v6e-256", "v4-8", "v5p:4x4x8"
    c.compile.num_slices = 1          # multi-slice: this many copies of the topology
    c.compile.what = "train"          # "train" (the train step) or "sample" (one sampling batch)
    # Train step: also write DIR/compile/<topology>.executable; a training run with the same
    # --workdir on that topology loads it instead of compiling (udit_jax.executables).
    c.compile.save_executable = False
    # Every other mode keeps XLA's compiled programs in JAX's persistent compilation cache and
    # loads them when a later run compiles the same program (a restart, a resume, the next
    # sampling job; the demo's train step on a 2-core CPU: 25 s of XLA compile -> 3 s). "" =
    # $JAX_COMPILATION_CACHE_DIR if set, else <user cache>/xla (paths.user_cache_dir:
    # $UDIT_JAX_CACHE, $XDG_CACHE_HOME/udit_jax or ~/.cache/udit_jax); or a gs:// directory.
    c.compile.cache = True
    c.compile.cache_dir = ""

    # FID / sFID / IS of EMA samples (udit_jax.evaluation): in the loop every eval_every_steps,
    # and for --mode=evaluate (of a sample .npz, or of the export's samples). Both sample
    # images of random classes with the same settings and keys (seed), so the in-loop numbers
    # of step k equal --mode=evaluate's of step k's export with num_samples=in_loop_num_samples.
    c.eval = ml_collections.ConfigDict()
    c.eval.reference_npz = ""         # ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
    c.eval.inception_weights = ""     # pytorch-fid Inception weights
    c.eval.sample_npz = ""            # --mode=evaluate: the samples to score
    c.eval.output_json = ""           # --mode=evaluate: "" = <workdir>/eval/<sample>.json
    c.eval.in_loop_num_samples = 5000  # images per in-loop evaluation (its metrics: FID-5K)
    c.eval.sample_batch = 256         # in-loop: images per sampling call (global)
    c.eval.batch_size = 256           # Inception batch
    c.eval.is_split_size = 5000
    c.eval.preprocess = "adm"
    c.eval.fid_method = "sqrtm"
    c.eval.pr_distance = "float16"
    c.eval.inception_dtype = "float32"  # Inception compute; bfloat16 is faster, approximate
    c.eval.seed = 0
    # Sampling for evaluation (in the loop, and --mode=evaluate of an export when sample_npz is
    # ""): the papers' protocol by default (EVAL_PROTOCOL), whatever the preview settings and
    # the training dtype: 50,000 images of random classes, the objective's protocol sampler
    # (DDPM: 250 respaced steps), float32, and the guidance of the paper table the config
    # reproduces (named in its docstring; U-DiT's and DiT's 400K tables are without guidance).
    c.eval.num_samples = 50_000       # --mode=evaluate (the in-loop count is in_loop_num_samples)
    c.eval.export_dir = ""            # "" = <workdir>/export
    c.eval.sampler = ""               # "" = EVAL_PROTOCOL[objective]'s sampler
    c.eval.steps = ""                 # "" = that sampler's protocol (or default) steps
    c.eval.cfg_scale = 1.0            # > 1: classifier-free guidance (DiT-XL/2's FID 2.27: 1.5)
    c.eval.guide_all_channels = False  # False: guide the first 3 channels, as officially
    c.eval.dtype = "float32"          # sampling compute dtype
    # --mode=evaluate writing reference statistics of config.data instead of scoring.
    c.eval.write_reference_to = ""
    # "fashion_mnist": score preview grids and --mode=evaluate samples with the project's
    # Fashion-MNIST classifier (recognised %, Frechet distance; evaluation.fashion_mnist_quality).
    c.eval.quality = ""
    c.eval.reference_max_images = 0  # 0 = every image
    c.eval.reference_with_images = False

    # Training objective and its switches (validate_objective checks them; see make_objective).
    c.objective = "ddpm"              # "ddpm" (DiT / U-DiT's eps objective) or "transport" (SiT)
    c.transport = ml_collections.ConfigDict()   # SiT's create_transport / sample.py arguments
    c.transport.path_type = "Linear"  # Linear | GVP | VP
    c.transport.prediction = "velocity"  # velocity | noise | score
    c.transport.loss_weight = "none"  # none | velocity | likelihood (noise / score models)
    c.transport.train_eps = ml_collections.config_dict.placeholder(float)   # None: SiT's rule
    c.transport.sample_eps = ml_collections.config_dict.placeholder(float)
    # Transport samplers are sample.sampler / eval.sampler "ode" or "sde"; their steps count
    # time-grid points, as SiT's num_sampling_steps.
    # dopri5 (adaptive, SiT's default) | euler | midpoint | heun2 | heun3 | rk4 (fixed steps)
    c.transport.ode_method = "dopri5"
    c.transport.atol = 1e-6           # dopri5's error tolerances (SiT's defaults)
    c.transport.rtol = 1e-3
    c.transport.sde_method = "Euler"  # Euler | Heun
    c.transport.diffusion_form = "sigma"  # SBDM | sigma | linear | decreasing | inccreasing-decreasing
    c.transport.diffusion_norm = 1.0
    c.transport.last_step = "Mean"    # Mean | Tweedie | Euler | none
    c.transport.last_step_size = 0.04
    c.timestep_sampling = ml_collections.ConfigDict()   # training times, both objectives
    c.timestep_sampling.kind = "uniform"  # uniform | logit_normal (noise level sigmoid(mean + std n))
    c.timestep_sampling.mean = 0.0
    c.timestep_sampling.std = 1.0
    c.loss_weighting = ml_collections.ConfigDict()
    c.loss_weighting.kind = "none"    # none | min_snr (min(SNR, gamma) on the data-prediction MSE)
    c.loss_weighting.gamma = 5.0
    # CFG only at noise levels u in [low, high] (u = t/T for DDPM, 1 - t for SiT's time; 0 is
    # data, 1 noise), for previews, sampling jobs and evaluation; (0, 1) guides everywhere.
    c.sample.guidance_interval = (0.0, 1.0)
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
    # U-DiT's blocks stay unrolled (base_config): that step runs faster and needs less memory
    # than the scanned one, which compiles in about half the time (figures: configs/udit_l.py).
    return config


# ========================================================================================
# Value checks: what a config's numbers must satisfy, checked before anything is built.

_DTYPES = ("float32", "bfloat16", "float16")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _field(config, field: str):
    for part in field.split("."):
        config = config[part]
    return config


def check_values(config) -> None:
    """Raises ValueError naming the first field whose value no job can use.

    Pure and cheap (no files, no devices): sizes and counts positive, seeds non-negative,
    the learning rate positive and finite, warmup and guidance non-negative, dtypes known.
    Guidance scales from 0 to 1 are allowed and mean no guidance (the official scripts guide
    only above 1).
    """
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{field}={_field(config, field)!r}: {what}")

    def positive_int(field: str) -> None:
        value = _field(config, field)
        need(isinstance(value, int) and value > 0, field, "must be a positive integer")

    def non_negative(field: str, what: str) -> None:
        value = _field(config, field)
        need(_finite(value) and value >= 0, field, what)

    for field in ("data.image_size", "data.channels", "data.num_classes",
                  "diffusion.diffusion_steps", "sample.per_class", "eval.num_samples",
                  "eval.in_loop_num_samples"):
        positive_int(field)
    need(isinstance(config.sample.num_images, int) and config.sample.num_images >= 0,
         "sample.num_images", "must be a non-negative integer (0: the class grid "
         "sample.classes x sample.per_class)")
    for field in ("seed", "sample.seed", "eval.seed"):
        value = _field(config, field)
        need(isinstance(value, int) and value >= 0, field, "seeds are non-negative integers")
    opt = config.optimizer
    need(_finite(opt.learning_rate) and opt.learning_rate > 0, "optimizer.learning_rate",
         "must be a positive finite number (the official recipe: 1e-4)")
    need(isinstance(opt.warmup_steps, int) and opt.warmup_steps >= 0, "optimizer.warmup_steps",
         "must be a non-negative integer (0: constant learning rate)")
    non_negative("optimizer.weight_decay", "must be a non-negative finite number")
    non_negative("optimizer.grad_clip_norm", "must be a non-negative finite number (0: off)")
    need(_finite(opt.eps) and opt.eps > 0, "optimizer.eps", "must be a positive finite number")
    for field in ("optimizer.b1", "optimizer.b2"):
        need(_finite(_field(config, field)) and 0 <= _field(config, field) < 1, field,
             "must be in [0, 1)")
    classes = config.sample.classes
    need(isinstance(classes, (tuple, list)) and all(isinstance(c, int) for c in classes),
         "sample.classes", "class ids, e.g. --config.sample.classes=0,1,2")
    for field in ("model.dtype", "eval.dtype"):
        need(_field(config, field) in _DTYPES, field, f"use one of {_DTYPES}")
    need(config.model.matmul_precision in MATMUL_PRECISIONS, "model.matmul_precision",
         f"use one of {MATMUL_PRECISIONS} (None: JAX's default)")
    need(config.model.remat_keeps in REMAT_KEEPS, "model.remat_keeps",
         f"use one of {REMAT_KEEPS} (what a remat'd block keeps for the backward)")
    for field in ("sample.cfg_scale", "eval.cfg_scale"):
        non_negative(field, "guidance scales are finite and >= 0 (up to 1: no guidance; the "
                            "papers guide with 1.5 or 4)")
    if config.model.kwargs.get("attention_impl") == "cudnn":
        # cuDNN's fused attention has no float32 kernel.
        for field in ("model.dtype", "eval.dtype"):
            need(_field(config, field) in ("bfloat16", "float16"), field,
                 "model.kwargs.attention_impl='cudnn' (the fused GPU kernel) computes in "
                 "bfloat16 or float16 only: set this to bfloat16, or leave attention_impl unset "
                 "(XLA's attention, any dtype)")
    for name, value in config.model.kwargs.items():
        if name in ("input_size", "in_channels", "num_classes", "hidden_size", "patch_size",
                    "num_heads"):
            need(isinstance(value, int) and value > 0, f"model.kwargs.{name}",
                 "must be a positive integer")


# ========================================================================================
# Validation: everything that can be checked before compiling (the workdir is the job's).

def validate(config):
    """Raises ValueError naming the field and the fix for a config that cannot run on these
    devices; returns the model. Files are the jobs' to check (training checks the in-loop
    evaluation's at its start: evaluation.in_training.check_requirements)."""
    check_values(config)
    n_dev, n_proc = jax.device_count(), jax.process_count()
    b, accum = config.batch_size, config.optimizer.grad_accum_steps
    if b <= 0 or accum <= 0 or b % accum:
        raise ValueError(f"batch_size={b} must be positive and divisible by "
                         f"optimizer.grad_accum_steps={accum}")
    if (b // accum) % n_dev:
        raise ValueError(f"global batch_size={b} (per microbatch {b // accum}) is not divisible by "
                         f"the {n_dev} devices; use a multiple of {n_dev * accum}")
    if b % n_proc:
        raise ValueError(f"batch_size={b} is not divisible by the {n_proc} processes")
    if config.total_steps <= 0:
        raise ValueError(f"total_steps={config.total_steps} must be positive")
    if not 0.0 <= config.optimizer.ema_decay <= 1.0:
        raise ValueError(f"optimizer.ema_decay={config.optimizer.ema_decay} must be in [0, 1]")
    for name in ("log_every_steps", "checkpoint_every_steps"):
        if config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive")
    for name in ("sample_every_steps", "eval_every_steps"):
        if not isinstance(config[name], int) or config[name] < 0:
            raise ValueError(f"{name}={config[name]!r} must be a non-negative integer (0: off)")
    # orbax's max_to_keep=0 deletes every checkpoint, older runs' included, at each save.
    keep, keep_every = config.checkpoint.keep, config.checkpoint.keep_every
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"checkpoint.keep={keep!r} must be a positive integer (the last N "
                         "checkpoints kept; a run needs at least its newest to resume)")
    if not isinstance(keep_every, int) or keep_every < 0:
        raise ValueError(f"checkpoint.keep_every={keep_every!r} must be a non-negative integer "
                         "(0: keep no extra steps)")
    parallel.resolve_rules(config.mesh.rules, tuple(config.mesh.axes))
    if not isinstance(config.mesh.shard_update, bool):
        raise ValueError(f"mesh.shard_update={config.mesh.shard_update!r}: use True or False")
    if config.model.kwargs.get("attention_impl") == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.kwargs.attention_impl='cudnn' is the fused attention of NVIDIA "
                         f"GPUs, and these devices are {jax.default_backend()}: leave it unset "
                         "(XLA's attention)")
    make_mesh(config)
    model = build_model(config)
    validate_objective(config)   # objective switches; the samplers fit the objective
    preview = sampling(config, "sample")
    if config.sample_every_steps and not config.sample.classes:
        raise ValueError("sample.classes is empty; list the class ids of the preview rows")
    bad = [c for c in config.sample.classes if not 0 <= c < config.data.num_classes]
    if config.sample_every_steps and bad:
        raise ValueError(f"sample.classes {bad} are outside [0, {config.data.num_classes})")
    used = {"sample": preview} if config.sample_every_steps else {}
    if config.eval_every_steps:
        missing = [k for k in ("reference_npz", "inception_weights") if not config.eval[k]]
        if missing:
            raise ValueError(f"eval_every_steps > 0 needs config.eval.{', config.eval.'.join(missing)} "
                             "(ADM reference batch, pytorch-fid Inception weights); or set "
                             "eval_every_steps=0")
        used["eval"] = sampling(config, "eval")
    for section, settings in used.items():
        if settings["cfg_scale"] > 1 and not model.class_dropout_prob:
            raise ValueError(f"{section}.cfg_scale > 1 needs the null-class embedding, which a "
                             f"model with class_dropout_prob=0 does not have; set "
                             f"{section}.cfg_scale=1")
    return model


# ========================================================================================
# Derived values.

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
    kwargs["matmul_precision"] = config.model.matmul_precision
    kwargs["remat"] = bool(config.model.remat)
    kwargs["remat_keeps"] = config.model.remat_keeps
    if config.model.scan_blocks:
        if models.model_family(config.model.name) != "U-DiT":
            raise ValueError(f"model.scan_blocks=True is a U-DiT option and model.name="
                             f"{config.model.name!r} is not a U-DiT: drop it or add "
                             "--config.model.scan_blocks=False")
        kwargs["scan_blocks"] = True
    return kwargs


def build_model(config):
    """The model the config describes; ValueError naming the problem when it cannot exist."""
    kwargs = model_kwargs(config)
    try:
        return models.build_model(config.model.name, **kwargs)
    except ValueError as e:
        raise ValueError(f"model.name={config.model.name!r} with {kwargs}: {e}") from e


def block_relayouts(config, target_of: Callable[[Any], Any]) -> tuple:
    """How a U-DiT checkpoint written with the other model.scan_blocks restores into the
    layout `config` builds.

    The two layouts hold the same params (stacked per stage, or one subtree per block), so a
    run may switch between them on resume. target_of(a config): the restore target that
    config builds (called for the other layout only when a checkpoint holds it). Sharded
    targets are converted on their devices, unsharded ones as host numpy. DiT: ().
    """
    from udit_jax import checkpoints
    from udit_jax.models.udit import relayout_blocks
    if models.model_family(config.model.name) != "U-DiT":
        return ()
    other = config.copy_and_resolve_references()
    other.model.scan_blocks = not config.model.scan_blocks
    relaid = functools.partial(relayout_blocks, depth=tuple(build_model(config).depth),
                               scanned=bool(config.model.scan_blocks))

    def convert(restored, target):
        if all(getattr(leaf, "sharding", None) is not None for leaf in jax.tree.leaves(target)):
            return jax.jit(relaid, out_shardings=jax.tree.map(lambda a: a.sharding, target))(
                restored)
        return relaid(restored)

    return (checkpoints.Relayout(lambda: target_of(other), convert,
                                 f"model.scan_blocks={other.model.scan_blocks}"),)


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


def diffusion_arguments(config) -> dict[str, Any]:
    """create_diffusion's arguments besides the respacing (what an export records)."""
    return {"noise_schedule": config.diffusion.noise_schedule,
            "diffusion_steps": config.diffusion.diffusion_steps,
            "learn_sigma": config.diffusion.learn_sigma}


def make_diffusion(config, timestep_respacing: str = ""):
    """The training diffusion (all steps), or a sampler's with `timestep_respacing`."""
    return diffusion_lib.create_diffusion(timestep_respacing, **diffusion_arguments(config))


def make_mesh(config):
    """The device mesh of config.mesh (axis names and sizes are config data)."""
    return parallel.mesh_from_config(config.mesh)


def vae_arguments(config) -> dict[str, Any]:
    """build_vae's arguments of the SD VAE (with the latent scale of config.data)."""
    return dict(config.vae.arguments, scaling_factor=config.data.latent_scale)


# The papers' evaluation sampling of each objective (sampler, steps): DiT's and U-DiT's
# FID-50K tables sample DDPM with 250 respaced steps; SiT's headline numbers its SDE sampler
# with 250 steps. config.eval.sampler / steps "" mean these.
EVAL_PROTOCOL = {"ddpm": ("ddpm", "250"), "transport": ("sde", "250")}


def sampling(config, section: str = "sample", objective: str | None = None) -> dict[str, Any]:
    """The resolved sampling settings of config.sample (previews, --mode=sample) or config.eval
    (in-loop evaluation, --mode=evaluate): {sampler, steps, cfg_scale, guidance_interval,
    guide_all_channels, transport_options, seed, dtype}.

    steps "" is the sampler's default (udit_jax.sampler.SAMPLERS); config.eval's sampler "" is
    the objective's protocol sampler (EVAL_PROTOCOL) with its steps. The sampler must sample
    models of `objective` (default config.objective; a job passes its export's,
    export_objective); transport_options are its settings from config.transport ({} for DDPM
    samplers). dtype: the compute dtype for sampling (config.eval.dtype; None for
    config.sample: the model's own).
    """
    if section not in ("sample", "eval"):
        raise ValueError(f"section={section!r}; use 'sample' or 'eval'")
    objective = config.objective if objective is None else objective
    own = config[section]
    name, steps = own.sampler, own.steps
    if section == "eval" and not name:
        if objective not in EVAL_PROTOCOL:
            raise ValueError(f"objective={objective!r}; use one of {tuple(EVAL_PROTOCOL)}")
        name, protocol_steps = EVAL_PROTOCOL[objective]
        steps = steps or protocol_steps
    sampler_lib.check_sampler(name, objective, f"{section}.sampler")
    steps = steps or sampler_lib.default_steps(name)
    try:
        low, high = guidance.check_interval(config.sample.guidance_interval)
    except ValueError as e:
        raise ValueError(f"sample.guidance_interval: {e}") from e
    settings = {"sampler": name, "steps": str(steps), "cfg_scale": float(own.cfg_scale),
                "guidance_interval": (low, high),
                "guide_all_channels": bool(own.guide_all_channels),
                "transport_options": transport_options(config, name), "seed": int(own.seed),
                "dtype": own.dtype if section == "eval" else None}
    if objective == config.objective:
        # (A job's export of another objective is checked against its own record.)
        try:
            sampling_process(config, settings)
        except ValueError as e:
            raise ValueError(f"{section}: sampler {name!r} with steps {settings['steps']!r}: "
                             f"{e}") from e
    return settings


def sampling_process(config, settings: dict):
    """What the sampler of sampling(config, ...)'s settings integrates (sampler.Sampler's
    process): the diffusion respaced to its steps, or the transport sampling function."""
    if config.objective == "transport":
        return make_transport_sampling_fn(config, settings["sampler"], settings["steps"])
    return make_diffusion(config, settings["steps"])


def sampling_tag(settings: dict) -> str:
    """A folder name of sampling settings, e.g. "ddpm-250-cfg4-seed0" (with the transport
    method and a guidance interval other than (0, 1) when set)."""
    method = settings["transport_options"].get("sampling_method")
    low, high = settings["guidance_interval"]
    return (settings["sampler"] + (f"_{method}" if method else "") + f"-{settings['steps']}"
            + f"-cfg{settings['cfg_scale']:g}"
            + ("-allch" if settings["guide_all_channels"] else "")
            + ("" if (low, high) == (0.0, 1.0) else f"-interval{low:g}-{high:g}")
            + f"-seed{settings['seed']}")


def make_sampler(config, model, mesh, section: str = "sample"):
    """(sampler.Sampler, vae_params) of config.sample / config.eval settings for `model` on
    `mesh` (vae_params is None for pixel models). The same images as `--mode=sample` of an
    export of the same params with the same settings (and dtype)."""
    settings = sampling(config, section)
    if settings["guide_all_channels"]:
        model = model.clone(cfg_channels=None)
    if settings["dtype"]:
        model = model.clone(dtype=jnp.dtype(settings["dtype"]))
    vae = vae_params = None
    if is_latent(config):
        vae, vae_params = sampler_lib.load_vae(vae_arguments(config), config.vae.weights, mesh)
    sampler = sampler_lib.Sampler(model, sampling_process(config, settings),
                                  sampler=settings["sampler"], cfg_scale=settings["cfg_scale"],
                                  guidance_interval=settings["guidance_interval"], vae=vae,
                                  mesh=mesh)
    return sampler, vae_params


# ========================================================================================
# The objective: DDPM or transport, timestep sampling, loss weighting, guidance interval.

def _transport_arg(value: str | None) -> str | None:
    return None if value in (None, "none", "None") else value


def make_transport(config):
    from udit_jax.diffusion import transport
    t = config.transport
    try:
        return transport.create_transport(t.path_type, t.prediction, _transport_arg(t.loss_weight),
                                          t.train_eps, t.sample_eps)
    except ValueError as e:
        raise ValueError(f"config.transport: {e}") from e


def transport_options(config, sampler: str) -> dict[str, Any]:
    """config.transport's settings of a transport sampler as its sample_ode / sample_sde
    keyword arguments ({} for DDPM samplers)."""
    t = config.transport
    if sampler == "ode":
        return {"sampling_method": t.ode_method, "atol": float(t.atol), "rtol": float(t.rtol)}
    if sampler == "sde":
        return {"sampling_method": t.sde_method, "diffusion_form": t.diffusion_form,
                "diffusion_norm": float(t.diffusion_norm),
                "last_step": _transport_arg(t.last_step),
                "last_step_size": float(t.last_step_size)}
    return {}


def make_transport_sampling_fn(config, sampler: str, steps):
    """The SiT sampling function (diffusion.transport.SamplingFn) of config.transport for
    sampler "ode" / "sde" with `steps` grid points (sampler.transport_process)."""
    sampler_lib.check_sampler(sampler, "transport")
    make_transport(config)   # names config.transport in its errors
    try:
        return sampler_lib.transport_process(objective_description(config)["transport"], sampler,
                                             steps, transport_options(config, sampler))
    except ValueError as e:
        raise ValueError(f"config.transport with sampler {sampler!r}: {e}") from e


def objective_description(config) -> dict[str, Any]:
    """What an export records of the objective: {"name"} and, for transport, the
    create_transport arguments {"transport": {...}}."""
    if config.objective != "transport":
        return {"name": config.objective}
    t = config.transport
    return {"name": "transport",
            "transport": {"path_type": t.path_type, "prediction": t.prediction,
                          "loss_weight": _transport_arg(t.loss_weight),
                          "train_eps": t.train_eps, "sample_eps": t.sample_eps}}


def export_objective(info: dict) -> str:
    """The objective an export's info (export.read_info) was trained with; older exports
    without the record are DDPM's."""
    return (info.get("objective") or {"name": "ddpm"})["name"]


def validate_objective(config) -> None:
    """ValueError naming the field for an unknown option or a setting SiT cannot run."""
    from udit_jax.diffusion import objective, timesteps
    if config.objective not in objective.OBJECTIVES:
        raise ValueError(f"objective={config.objective!r}; use one of {objective.OBJECTIVES}")
    ts = config.timestep_sampling
    try:
        timesteps.TimestepSampling(ts.kind, ts.mean, ts.std)
    except ValueError as e:
        raise ValueError(f"config.timestep_sampling: {e}") from e
    lw = config.loss_weighting
    if lw.kind not in ("none", "min_snr"):
        raise ValueError(f"loss_weighting.kind={lw.kind!r}; use 'none' or 'min_snr'")
    if lw.kind == "min_snr" and not lw.gamma > 0:
        raise ValueError(f"loss_weighting.gamma={lw.gamma}; min_snr needs gamma > 0 (5 is usual)")
    if config.objective == "transport":
        tr = make_transport(config)
        if lw.kind == "min_snr" and tr.loss_weight is not None:
            raise ValueError(f"loss_weighting.kind='min_snr' replaces transport.loss_weight="
                             f"{config.transport.loss_weight!r}; set one of them to 'none'")
    # The samplers of previews, sampling jobs and evaluation fit the objective and can run.
    sampling(config, "sample")
    sampling(config, "eval")


def make_objective(config):
    """The training objective (diffusion.objective) of a validated config."""
    from udit_jax.diffusion import objective, timesteps
    validate_objective(config)
    ts = config.timestep_sampling
    times = timesteps.TimestepSampling(ts.kind, ts.mean, ts.std)
    gamma = config.loss_weighting.gamma if config.loss_weighting.kind == "min_snr" else None
    if config.objective == "transport":
        return objective.TransportObjective(make_transport(config), times, gamma)
    return objective.DDPMObjective(make_diffusion(config), times, gamma)
