"""In-loop evaluation: sample from the EMA model and score FID / sFID / IS during training.

`train.train_and_evaluate` calls `evaluate_during_training(config, model, ema_params, step)`
every `config.eval_every_steps` and logs the returned scalars under "eval/". It reads
config.eval:
  reference_npz, inception_weights   ADM reference batch and pytorch-fid weights (required)
  in_loop_num_samples [5000]         images sampled per evaluation (random classes)
  sample_batch [256]                 images per sampling call (global)
  seed [0]                           noise / class seed (folded with the step)
  preprocess ["adm"], fid_method ["sqrtm"], is_split_size [5000], batch_size [256]
and the preview sampler's settings config.sample.{sampler, steps, cfg_scale}. Precision and
recall are not computed in the loop (they need the reference images' features and are
slow); use `--mode=evaluate` on exported samples for the full table. The scalars' names
carry the sample count (FID-5K): they are not the papers' FID-50K. `check_requirements`
checks at the start of training what the first evaluation would otherwise find hours later.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from udit_jax import config as config_lib
from udit_jax.evaluation import metrics as M
from udit_jax.evaluation import reference as R
from udit_jax.evaluation.convert_inception import load_inception_variables
from udit_jax.evaluation.evaluate import Evaluator, metric_names


@functools.lru_cache(maxsize=2)
def _evaluator(reference_npz: str, inception_weights: str, preprocess: str, batch_size: int,
               fid_method: str, is_split_size: int) -> Evaluator:
    """Built once per setting: weights, reference statistics and compiled network are reused."""
    return Evaluator(reference_npz, inception_weights, preprocess=preprocess,
                     batch_size=batch_size, fid_method=fid_method, is_split_size=is_split_size,
                     progress=False)


def to_uint8(x: jax.Array) -> jax.Array:
    """Model-range images [-1, 1] -> uint8 the way the official sampling scripts save them
    (clip(127.5 x + 128)); one channel (Fashion-MNIST) is repeated to RGB for Inception."""
    img = jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)
    return jnp.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


_SAMPLERS: dict[int, tuple] = {}  # id(model) -> (model, sampler): the loop reuses one model


def _cached_sampler(config, model):
    if id(model) not in _SAMPLERS:
        _SAMPLERS[id(model)] = (model, make_image_sampler(config, model))
    return _SAMPLERS[id(model)][1]


def make_image_sampler(config, model):
    """sample(ema_params, key, labels [B]) -> uint8 images [B, H, W, 3] (jitted)."""
    from udit_jax import diffusion as diffusion_lib
    from udit_jax.config import is_latent
    s = config.sample
    d = diffusion_lib.create_diffusion(str(s.steps), noise_schedule=config.diffusion.noise_schedule,
                                       learn_sigma=config.diffusion.learn_sigma,
                                       diffusion_steps=config.diffusion.diffusion_steps)
    latent = is_latent(config)
    decode = None
    if latent:
        from udit_jax.data.latents import load_vae
        vae, vae_params, _ = load_vae(config)
        decode = lambda z: vae.apply({"params": vae_params}, z, method="decode")  # noqa: E731
    loop = {"ddpm": d.p_sample_loop, "ddim": d.ddim_sample_loop,
            "dpm": d.dpm_solver_sample_loop}[s.sampler]
    null_class = config.data.num_classes

    @jax.jit
    def sample(ema_params, key, labels):
        n = labels.shape[0]
        shape = (n, model.input_size, model.input_size, model.in_channels)
        if s.cfg_scale > 1.0:
            y = jnp.concatenate([labels, jnp.full_like(labels, null_class)])
            shape = (2 * n,) + shape[1:]
            model_fn = lambda x, t, y: model.apply(  # noqa: E731
                {"params": ema_params}, x, t, y, s.cfg_scale, method="forward_with_cfg")
        else:
            y = labels
            model_fn = lambda x, t, y: model.apply({"params": ema_params}, x, t, y)  # noqa: E731
        x = loop(model_fn, shape, key=key, clip_denoised=not latent, model_kwargs={"y": y})[:n]
        if decode is not None:
            x = decode(x / config.data.latent_scale)
        return to_uint8(x)

    return sample


def check_requirements(config) -> None:
    """Raises ValueError / FileNotFoundError when in-loop evaluation could not run: reference
    batch and Inception weights named, present and readable, the sample count valid for the
    IS split, the VAE weights present for a latent model."""
    ev = config.get("eval")
    if ev is None or not ev.get("reference_npz") or not ev.get("inception_weights"):
        raise ValueError("eval_every_steps > 0 needs config.eval.reference_npz (ADM reference "
                         "batch) and config.eval.inception_weights (pytorch-fid weights)")
    M.check_split(int(ev.get("in_loop_num_samples", 5000)),
                  int(ev.get("is_split_size", M.IS_SPLIT_SIZE)))
    if not os.path.isfile(ev.reference_npz):
        raise FileNotFoundError(f"config.eval.reference_npz={ev.reference_npz} not found (the ADM "
                                "reference batch, e.g. VIRTUAL_imagenet256_labeled.npz)")
    keys = R.npz_keys(ev.reference_npz)
    if R.IMAGES_KEY not in keys and R.load_statistics(ev.reference_npz) is None:
        raise ValueError(f"config.eval.reference_npz={ev.reference_npz} holds neither images "
                         f"(arr_0) nor statistics (mu, sigma, mu_s, sigma_s); keys: {keys}")
    load_inception_variables(ev.inception_weights)
    if config_lib.is_latent(config):
        weights = config.vae.get("weights")
        if not weights or not os.path.isfile(weights):
            raise FileNotFoundError(f"config.vae.weights={weights!r} is not a file: in-loop "
                                    "evaluation of a latent model decodes with the SD VAE")


def evaluate_during_training(config, model, ema_params, step: int) -> dict[str, float]:
    """{"FID-5K", "sFID-5K", "IS-5K"} (named by the count) of
    config.eval.in_loop_num_samples EMA samples."""
    ev = config.eval
    num = int(ev.get("in_loop_num_samples", 5000))
    split = int(ev.get("is_split_size", M.IS_SPLIT_SIZE))
    M.check_split(num, split)
    evaluator = _evaluator(str(ev.reference_npz), str(ev.inception_weights),
                           ev.get("preprocess", "adm"), int(ev.get("batch_size", 256)),
                           ev.get("fid_method", "sqrtm"), split)
    sample = _cached_sampler(config, model)
    batch = int(ev.get("sample_batch", 256))
    key = jax.random.fold_in(jax.random.PRNGKey(int(ev.get("seed", 0))), step)

    def batches():
        for i, start in enumerate(range(0, num, batch)):
            k_labels, k_noise = jax.random.split(jax.random.fold_in(key, i))
            labels = jax.random.randint(k_labels, (min(batch, num - start),), 0,
                                        config.data.num_classes)
            yield np.asarray(jax.device_get(sample(ema_params, k_noise, labels)))

    acts = evaluator.features.from_batches(batches(), num, f"eval step {step}",
                                           progress=False)
    scores = evaluator.score(acts, with_pr=False)
    return {name: scores[k] for k, name in metric_names(num).items()}
