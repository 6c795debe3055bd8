"""Training: the train state, the sharded train step and the loop.

    train.train_and_evaluate(config, workdir)   # what `python -m udit_jax.main` calls
    trainer = train.make_trainer(config)        # the setup alone (benchmarks reuse it)

Sections: validation -> data -> train state and shardings -> train step -> setup ->
previews -> logging -> the loop. One process per host; every process runs the same code
(SPMD); only process 0 writes logs, TensorBoard and PNGs. What a config means (model,
diffusion, mesh, sampling settings) comes from udit_jax.config; previews and in-loop
evaluation sample through udit_jax.sampler, as `--mode=sample` does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from udit_jax import checkpoints, data, executables, memory_fit, models, parallel, paths
from udit_jax import config as config_lib
from udit_jax import sampler as sampler_lib
from udit_jax.evaluation import in_training

PyTree = Any


# ========================================================================================
# Validation: the config's own checks (config.validate), in-loop evaluation's files, the workdir.

def validate(config, workdir) -> Any:
    """Everything a training run checks before compiling: config.validate, the files in-loop
    evaluation reads (so a missing one fails now, not at the first evaluation hours in) and
    the workdir (paths.check_output_dir). Raises ValueError / OSError; returns the model."""
    model = config_lib.validate(config)
    check_run(config, workdir)
    return model


def check_run(config, workdir) -> None:
    """The checks of a training run beyond config.validate (see validate)."""
    if config.eval_every_steps:
        in_training.check_requirements(config)
    if config.sample_every_steps and config.eval.quality:
        from udit_jax.evaluation.fashion_mnist_quality import check_quality_config
        check_quality_config(config)   # before the workdir records the run's config
    paths.check_output_dir(paths.resolve(workdir), "--workdir")


# ========================================================================================
# Data.

class SyntheticBatches:
    """Deterministic learnable fake data for tests and benchmarks (data.source='synthetic').

    Batch i is a function of (seed, i) only, so any process count sees the same global
    batches: each example is its class's fixed random pattern plus a little noise. Pixel
    batches: {"image": [b, H, W, C] in [-1, 1], "label": [b]}; latent batches: {"mean",
    "std": [b, h, w, 4], "label"}. `b` is this process's share of the global batch.
    """

    def __init__(self, config, process_index: int, process_count: int):
        self.latent = config_lib.is_latent(config)
        size = config.data.image_size // (8 if self.latent else 1)
        self.shape = (size, size, 4 if self.latent else config.data.channels)
        self.global_batch = config.batch_size
        self.local = config.batch_size // process_count
        self.offset = process_index * self.local
        self.seed = config.seed
        self.num_classes = config.data.num_classes
        self.templates = np.random.default_rng([self.seed, 2**31]).uniform(
            -0.8, 0.8, (self.num_classes,) + self.shape).astype(np.float32)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        labels = rng.integers(0, self.num_classes, self.global_batch)
        x = self.templates[labels] + 0.1 * rng.standard_normal(
            (self.global_batch,) + self.shape).astype(np.float32)
        rows = slice(self.offset, self.offset + self.local)
        labels = labels[rows].astype(np.int32)
        if self.latent:
            return {"mean": x[rows], "std": np.full_like(x[rows], 0.05), "label": labels}
        return {"image": np.clip(x[rows], -1, 1), "label": labels}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def make_data_iterator(config, workdir: epath.Path) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches: next() -> numpy arrays of batch_size / process_count rows;
    get_state()/set_state() for checkpoints."""
    if config.data.source == "synthetic":
        return SyntheticBatches(config, jax.process_index(), jax.process_count())
    return data.make_loader(config, global_batch_size=config.batch_size, seed=config.seed,
                            workdir=str(workdir))


# ========================================================================================
# Train state and its shardings.

@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32, number of updates applied
    params: PyTree         # float32
    ema_params: PyTree     # float32, EMA of params (official: a copy at step 0)
    opt_state: PyTree
    rng: jax.Array         # [2] uint32 raw key; step keys are fold_in(rng, step)


def _init_state_boxed(model, tx, seed: int) -> TrainState:
    """The initial state with params still boxed by their logical axis names."""
    params_key, step_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(params_key, *model.example_inputs(1))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                      rng=step_rng)


def state_shardings(model, tx, seed: int, mesh, rules,
                    shard_update: bool = False) -> tuple[TrainState, TrainState]:
    """(abstract unboxed TrainState, its NamedShardings) from the params' logical axes;
    with `shard_update` the optimizer state and the EMA are also split over the data-parallel
    axes (parallel.update_sharding), so each device updates its part of every parameter."""
    boxed = jax.eval_shape(functools.partial(_init_state_boxed, model, tx, seed))
    logical = nn.get_partition_spec(boxed)
    abstract = nn.unbox(boxed)
    shardings = parallel.logical_to_shardings(logical, abstract, mesh, rules)
    if shard_update:
        split = lambda tree, like: jax.tree.map(  # noqa: E731
            lambda s, a: parallel.update_sharding(s, a.shape), tree, like)
        shardings = shardings.replace(opt_state=split(shardings.opt_state, abstract.opt_state),
                                      ema_params=split(shardings.ema_params, abstract.ema_params))
    return abstract, shardings


def init_state(model, tx, seed: int, shardings: TrainState) -> TrainState:
    init = jax.jit(lambda: nn.unbox(_init_state_boxed(model, tx, seed)), out_shardings=shardings)
    # The program runs once. On CPUs XLA's cheapest backend optimisation compiles it about 3x
    # faster (the demo: ~10 s less before the first step) and it still runs in under a second.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.lower().compile(compiler_options=options)()


def abstract_state_on_mesh(config, model, tx, mesh) -> TrainState:
    """ShapeDtypeStructs of the train state carrying their shardings on `mesh` (restore target)."""
    return _with_shardings(*state_shardings(model, tx, config.seed, mesh, config.mesh.rules,
                                            config.mesh.shard_update))


def _with_shardings(abstract: TrainState, shardings: TrainState) -> TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def restore_ema_params(config, workdir: str) -> tuple[Any, PyTree, int]:
    """(model, EMA params, step) of the newest readable checkpoint in `workdir`, laid out on
    the current devices (any count); for exporting and sampling a trained model. Read only."""
    model = config_lib.build_model(config)
    tx, _ = config_lib.make_optimizer(config.optimizer)
    mesh = config_lib.make_mesh(config)
    # Laid out as the params (whole on every data-parallel device), also when training split
    # the EMA's update over them (mesh.shard_update): sampling reads every weight each step.
    def target_of(c):
        return {"ema_params": abstract_state_on_mesh(c, config_lib.build_model(c), tx, mesh).params}
    target = target_of(config)
    step, state = checkpoints.restore_params(
        workdir, target, config=config, relayouts=config_lib.block_relayouts(config, target_of))
    return model, state["ema_params"], step


# ========================================================================================
# The train step.

def x0_from_batch(batch: dict, key: jax.Array, latent_scale: float) -> jax.Array:
    """Diffusion targets x0 [B, H, W, C]: images, or posterior samples of latents * scale."""
    if "image" in batch:
        return batch["image"]
    # A fresh posterior sample every step, as the official train.py does with the VAE.
    return data.sample_latents(batch, key, latent_scale)


def make_train_step(model, objective, tx, schedule, config, mesh):
    """train_step(state, batch) -> (state, metrics), pure; jit it with shardings.

    objective: config_lib.make_objective(config) (DDPM or transport, with their time
    sampling and loss weighting)."""
    opt = config.optimizer
    accum = opt.grad_accum_steps
    images = parallel.batch_sharding(mesh, 4)

    def draw(batch, key):
        """The step's random inputs for the whole global batch (sharded like it)."""
        k_x0, k_t, k_noise = jax.random.split(key, 3)
        x0 = jax.lax.with_sharding_constraint(
            x0_from_batch(batch, k_x0, config.data.latent_scale), images)
        t = objective.sample_t(k_t, x0.shape[:1])
        noise = jax.lax.with_sharding_constraint(jax.random.normal(k_noise, x0.shape, x0.dtype),
                                                 images)
        return {"x0": x0, "t": t, "noise": noise, "y": batch["label"]}

    def loss_fn(params, inputs, dropout_key):
        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y, train=True,
                               rngs={"label_dropout": dropout_key})

        terms = objective.training_losses(model_fn, inputs["x0"], inputs["t"],
                                          noise=inputs["noise"], model_kwargs={"y": inputs["y"]})
        metrics = {k: jnp.mean(terms[k]) for k in ("loss", "mse", "vb") if k in terms}
        return metrics["loss"], metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(params, inputs, dropout_key):
        if accum == 1:
            (_, metrics), grads = grad_fn(params, inputs, dropout_key)
            return grads, metrics
        # Microbatches in a scan: the update of the whole batch with 1/accum of the activations.
        # Microbatch i takes rows i, i + accum, ..., so every device keeps working on each.
        micro = jax.tree.map(
            lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), inputs)

        def body(carry, xs):
            i, mb = xs
            (_, m), g = grad_fn(params, mb, jax.random.fold_in(dropout_key, i))
            return jax.tree.map(jnp.add, carry, (g, m)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like,
                             (params, jax.eval_shape(grad_fn, params, first, dropout_key)[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        return jax.tree.map(lambda x: x / accum, (grads, metrics))

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        draw_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        # The models' forms for the mesh's platform (and TPU generation) only, forward and
        # backward (models.forms_for: other platforms' residuals would cost HBM traffic
        # under remat).
        with models.forms_for(*parallel.forms_device(mesh)):
            grads, metrics = grads_and_metrics(state.params, draw(batch, draw_key), dropout_key)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = opt.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if opt.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params, ema = keep(params, state.params), keep(ema, state.ema_params)
            opt_state = keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state)
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), finite=finite)
        return new_state, metrics

    return train_step


def jit_train_step(train_step, shardings: TrainState, mesh, example_batch: dict):
    batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in example_batch.items()}
    jitted = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                     out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    rules = parallel.activation_rules(mesh)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Traced under the mesh and the activation rules: the models' activation names
        # (models/layers.py) become sharding constraints (the batch stays on the data axes).
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    def lower(*args):
        # Ahead-of-time lowering (udit_jax.compile) under the same mesh and rules.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args)

    step.lower = lower
    return step


# ========================================================================================
# Setup: everything the loop (and the benchmarks) need from a config, built once.

@dataclasses.dataclass(frozen=True)
class Trainer:
    config: ml_collections.ConfigDict
    model: Any
    mesh: jax.sharding.Mesh
    objective: Any            # config_lib.make_objective: DDPM or transport
    tx: optax.GradientTransformation
    schedule: Callable
    abstract: TrainState      # unboxed ShapeDtypeStructs
    shardings: TrainState     # NamedShardings on mesh

    def init_state(self) -> TrainState:
        return init_state(self.model, self.tx, self.config.seed, self.shardings)

    def restore_target(self) -> TrainState:
        """The state's ShapeDtypeStructs carrying their shardings on the mesh."""
        return _with_shardings(self.abstract, self.shardings)

    def relayouts(self) -> tuple:
        """The other layouts a checkpoint of this run may hold (U-DiT's scanned or unrolled
        blocks), converted to this config's on restore."""
        return config_lib.block_relayouts(
            self.config,
            lambda c: abstract_state_on_mesh(c, config_lib.build_model(c), self.tx, self.mesh))

    def global_batch(self, local: dict) -> dict:
        return {k: parallel.global_batch_from_local(self.mesh, v) for k, v in local.items()}

    def jit_step(self, example_local: dict) -> Callable:
        step = make_train_step(self.model, self.objective, self.tx, self.schedule, self.config,
                               self.mesh)
        return jit_train_step(step, self.shardings, self.mesh, example_local)


def load_or_jit_step(trainer: Trainer, workdir, state: TrainState, local: dict) -> Callable:
    """The train step: the executable `--mode=compile` saved in workdir/compile when it was
    made from this very program for these devices (fast start-up on a pod), else jitted (and
    compiled on its first call), saying why a saved one was not used."""
    step = trainer.jit_step(local)
    folder = epath.Path(workdir) / "compile"
    if executables.saved_in(folder):
        lowered = step.lower(state, trainer.global_batch(local))
        loaded, where = executables.load_matching(folder, lowered, config=trainer.config)
        if loaded is not None:
            logging.info("train step loaded from %s (compiled by --mode=compile; no compile)",
                         where)
            return loaded
        logging.warning("not using the saved executables: %s", where)
    logging.info("compiling the train step...")
    return step


def first_step(step_fn: Callable, state: TrainState, batch: dict, trainer: "Trainer"):
    """The first call of the train step, which compiles it: XLA's out-of-memory error becomes
    one DoesNotFitError naming the sizes and the knobs (nothing ran, nothing is saved)."""
    try:
        return step_fn(state, batch)
    except jax.errors.JaxRuntimeError as e:
        if not memory_fit.is_out_of_memory(str(e)):
            raise
        needed, capacity = memory_fit.oom_bytes(str(e)) or (None, None)
        config, devices = trainer.config, jax.device_count()
        raise memory_fit.DoesNotFitError(
            memory_fit.does_not_fit(
                f"the train step of {config.model.name}", jax.devices()[0].device_kind, needed,
                capacity, at_least=False, global_batch=config.batch_size,
                per_device=config.batch_size / devices, mesh=dict(trainer.mesh.shape),
                unit="device", train=True, remat=bool(config.model.remat),
                remat_keeps=config.model.remat_keeps,
                shard_update=bool(config.mesh.shard_update))
            + ". `--mode=compile --config.compile.topology=<pod>` checks a TPU config on any "
            f"host before you rent it (XLA: {str(e).strip().splitlines()[0][:300]})") from e


def make_trainer(config) -> Trainer:
    """Validates the config (ValueError before compiling) and builds model, mesh, objective,
    optimizer and the train state's shardings."""
    model = config_lib.validate(config)
    mesh = config_lib.make_mesh(config)
    tx, schedule = config_lib.make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(model, tx, config.seed, mesh, config.mesh.rules,
                                          config.mesh.shard_update)
    return Trainer(config, model, mesh, config_lib.make_objective(config), tx, schedule,
                   abstract, shardings)


# ========================================================================================
# Sample previews: a grid from the EMA model with fixed classes and noise.

def make_preview(config, model, mesh) -> Callable[[PyTree], np.ndarray] | None:
    """preview(ema_params) -> uint8 grid [rows*H, cols*W, C], rows = sample.classes, cols =
    sample.per_class: the images `--mode=sample` draws for that grid from an export of the
    same params. None for latent models without VAE weights (nothing to decode with)."""
    if config_lib.is_latent(config) and not config.vae.weights:
        logging.warning("vae.weights is empty: latent sample previews are disabled (set it to "
                        "the SD VAE weights to see them)")
        return None
    sampler, vae_params = config_lib.make_sampler(config, model, mesh, "sample")
    labels = np.repeat(np.asarray(list(config.sample.classes), np.int32), config.sample.per_class)
    key = sampler_lib.noise_key(config_lib.sampling(config, "sample")["seed"])

    def preview(ema_params) -> np.ndarray:
        images = sampler(ema_params, key, labels, vae_params=vae_params)
        return sampler_lib.make_grid(sampler_lib.quantize(images), config.sample.per_class)

    return preview


# ========================================================================================
# Logging.

class NonFiniteError(FloatingPointError):
    pass


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    d, rem = divmod(seconds, 86400)
    return (f"{d}d " if d else "") + time.strftime("%H:%M:%S", time.gmtime(rem))


class _Logger:
    """Console, progress bar and TensorBoard output (process 0 only)."""

    def __init__(self, workdir: epath.Path, config, start_step: int, flops_per_image: float,
                 peak_tflops: float | None):
        self.enabled = jax.process_index() == 0
        self.config = config
        self.flops_per_image = flops_per_image
        self.peak = peak_tflops
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.window_start = time.perf_counter()
        self.writer = None
        self.bar = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            import tqdm
            self.writer = SummaryWriter(str(workdir / "tensorboard"))
            # The bar is for terminals; log files get the periodic log lines only.
            self.bar = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train",
                                 unit="step", dynamic_ncols=True, mininterval=2.0,
                                 disable=not sys.stderr.isatty())

    def restart_clock(self):
        self.window, self.window_steps = {}, 0
        self.window_start = time.perf_counter()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "finite":
                self.window[k] = self.window.get(k, 0.0) + float(v)
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, step: int) -> None:
        if not self.window_steps:
            return
        elapsed = time.perf_counter() - self.window_start
        means = {k: v / self.window_steps for k, v in self.window.items()}
        steps_per_s = self.window_steps / elapsed
        scalars = dict(means, steps_per_sec=steps_per_s,
                       images_per_sec=steps_per_s * self.config.batch_size)
        if self.flops_per_image:
            scalars["tflops_per_sec"] = scalars["images_per_sec"] * self.flops_per_image / 1e12
            if self.peak:
                scalars["mfu"] = scalars["tflops_per_sec"] / (self.peak * jax.device_count())
        if self.enabled:
            eta = (self.config.total_steps - step) / steps_per_s
            msg = (f"step {step}/{self.config.total_steps} loss {means['loss']:.4f}"
                   + (f" (mse {means['mse']:.4f} vb {means['vb']:.4f})" if "vb" in means else "")
                   + f" | {steps_per_s:.2f} steps/s {scalars['images_per_sec']:.1f} img/s"
                   + (f" {scalars['tflops_per_sec']:.3g} TFLOP/s" if "tflops_per_sec" in scalars else "")
                   + (f" MFU {100 * scalars['mfu']:.1f}%" if "mfu" in scalars else "")
                   + f" | ETA {_format_eta(eta)}")
            logging.info(msg)
            self.bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{scalars['images_per_sec']:.0f}")
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        self.restart_clock()

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, img, step, dataformats="HWC")
            self.writer.flush()

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self.writer.flush()

    def close(self):
        if self.enabled:
            self.bar.close()
            self.writer.close()


# ========================================================================================
# The loop.

class _MetricsDrain:
    """Fetches the metrics of step k while step k + 1 runs (keeps dispatch asynchronous) and
    stops on a non-finite loss unless the config skips such updates."""

    def __init__(self, log: _Logger, ckpt: checkpoints.Checkpointer, skip_nonfinite: bool):
        self.log, self.ckpt, self.skip_nonfinite = log, ckpt, skip_nonfinite
        self.pending = None   # (step, metrics on device)

    def push(self, step: int, metrics: dict) -> None:
        self()
        self.pending = (step, metrics)

    def __call__(self) -> None:
        if self.pending is None:
            return
        (at, metrics), self.pending = self.pending, None
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
            if not self.skip_nonfinite:
                raise NonFiniteError(
                    f"loss or gradient is NaN/Inf at step {at} (loss={metrics['loss']}, grad_norm="
                    f"{metrics['grad_norm']}); stopped without saving, the last good checkpoint "
                    f"(step {self.ckpt.latest_step()}) in {self.ckpt.directory} is intact. Lower "
                    "optimizer.learning_rate, set optimizer.grad_clip_norm (with "
                    "checkpoint.on_mismatch=load_params to keep the trained weights: clipping "
                    "changes the optimizer state), or set optimizer.skip_nonfinite=True to skip "
                    "such updates")
            logging.warning("non-finite loss/gradient at step %d: update skipped", at)
        self.log.add(metrics)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains until config.total_steps (resuming from workdir's latest checkpoint).

    Returns the final state; a SIGTERM or a preemption notice saves a checkpoint at the
    current step and returns early. Raises ValueError for an impossible config (before
    compiling) and NonFiniteError when the loss or gradients stop being finite.
    """
    # ---- setup ------------------------------------------------------------------------
    workdir = epath.Path(workdir)
    trainer = make_trainer(config)
    check_run(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with paths.exclusive_run(workdir, enabled=jax.process_index() == 0):
        return _train(config, workdir, trainer)


def _train(config, workdir: epath.Path, trainer: Trainer) -> TrainState:
    """train_and_evaluate's run, in a checked workdir that this run holds."""
    model, mesh = trainer.model, trainer.mesh
    iterator = make_data_iterator(config, workdir)
    ckpt = checkpoints.Checkpointer(workdir, keep=config.checkpoint.keep,
                                    keep_every=config.checkpoint.keep_every,
                                    async_save=config.checkpoint.async_save, config=config,
                                    on_mismatch=config.checkpoint.on_mismatch)

    # ---- restore or initialise ----------------------------------------------------------
    _, state = ckpt.restore(trainer.restore_target(), iterator, init=trainer.init_state,
                            relayouts=trainer.relayouts())
    start_step = int(jax.device_get(state.step))
    checkpoints.write_config_history(workdir, config, start_step)
    if start_step >= config.total_steps:
        logging.info("nothing to train: the checkpoint is at step %d and total_steps=%d "
                     "(--config.total_steps=N trains on to step N)", start_step, config.total_steps)

    # ---- logging, previews, evaluation, preemption ------------------------------------
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract.params))
    logging.info("model %s: %.2fM params; mesh %s; global batch %d; %d devices, %d processes",
                 config.model.name, n_params / 1e6, dict(mesh.shape), config.batch_size,
                 jax.device_count(), jax.process_count())
    flops_per_image = 3 * 2 * models.model_info(model)["gmacs"] * 1e9  # fwd + 2x bwd, 2 FLOPs/MAC
    log = _Logger(workdir, config, start_step, flops_per_image, parallel.peak_tflops_per_device())
    preview = make_preview(config, model, mesh) if config.sample_every_steps else None
    evaluate = (in_training.InTrainingEvaluation(config, model, mesh)
                if config.eval_every_steps else None)
    quality, score = None, None   # recognised % and FD of the previews (eval.quality)
    if preview is not None and config.eval.quality:
        from udit_jax.evaluation.fashion_mnist_quality import scorer_from_config
        quality = scorer_from_config(config)
    # Sampling reads every weight at every step: the EMA laid out as the params where
    # mesh.shard_update split it over the data axes.
    ema_for_sampling = (jax.jit(lambda p: p, out_shardings=trainer.shardings.params)
                        if config.mesh.shard_update else lambda p: p)
    sigterm = checkpoints.SigtermFlag() if jax.process_count() == 1 else None
    drain = _MetricsDrain(log, ckpt, config.optimizer.skip_nonfinite)
    every = lambda n: step % n == 0 or step == config.total_steps  # noqa: E731

    # ---- steps ------------------------------------------------------------------------
    step_fn = None
    step = start_step
    try:
        while step < config.total_steps:
            local = next(iterator)
            if step_fn is None:
                step_fn = load_or_jit_step(trainer, workdir, state, local)
                state, metrics = first_step(step_fn, state, trainer.global_batch(local), trainer)
            else:
                state, metrics = step_fn(state, trainer.global_batch(local))
            step += 1
            drain.push(step, metrics)
            if step == start_step + 1:
                drain()
                log.restart_clock()  # do not count compilation in the throughput
                logging.info("first step done (compiled)")
            preempted = (sigterm is not None and sigterm.received) or ckpt.reached_preemption(step)
            saving = every(config.checkpoint_every_steps) or preempted
            if every(config.log_every_steps) or preempted:
                drain()
                log.flush(step)
                if not saving:   # a failed asynchronous save stops the run now, not at the next
                    ckpt.learn_finished_save(step, state, iterator)
            if saving:
                drain()   # never save a state that went non-finite
                ckpt.save(step, state, iterator, wait=step == config.total_steps or preempted)
            if preempted:
                logging.warning("preempted: checkpoint saved at step %d; exiting", step)
                break
            wants_preview = preview is not None and every(config.sample_every_steps)
            wants_eval = evaluate is not None and step % config.eval_every_steps == 0
            if wants_preview or wants_eval:
                ema = ema_for_sampling(state.ema_params)   # gathered once for both
                if wants_preview:
                    img = preview(ema)
                    if jax.process_index() == 0:
                        sampler_lib.write_png(workdir / "samples" / f"step_{step:08d}.png", img)
                    log.image("samples/ema", img, step)
                    if quality is not None:
                        score = quality(img, config.sample.classes)
                        logging.info("samples at step %d: %s", step, score.summary())
                        log.scalars("quality", score.scalars(), step)
                if wants_eval:
                    log.scalars("eval", evaluate(ema, step), step)
                del ema   # a split run's gathered copy is not held through the next steps
        drain()
        if score is not None:
            logging.info("done at step %d; final samples %s", step, score.summary())
    finally:
        try:
            ckpt.close()
        finally:
            log.close()
        if sigterm is not None:
            sigterm.restore_handler()
    return state
