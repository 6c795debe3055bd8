"""In-loop evaluation: sample from the EMA model and score FID / sFID / IS during training.

    evaluate = InTrainingEvaluation(config, model, mesh)   # built once by train.py
    scores = evaluate(ema_params, step)                     # {"FID-5K", "sFID-5K", "IS-5K"}

The images are config.eval.in_loop_num_samples of random classes sampled by
udit_jax.sampler with the settings config.sampling(config, "eval") resolves (the papers'
protocol by default: DDPM-250, no guidance, float32 whatever the training dtype) and keys
from config.eval.seed, sharded over the mesh: each device samples its share of every batch
of config.eval.sample_batch. They are the images `--mode=evaluate` samples from an export of
the same params with --config.eval.num_samples=<in_loop_num_samples>, so in-loop numbers and
the evaluation job's agree. Scoring reads config.eval.{reference_npz, inception_weights,
preprocess, batch_size, fid_method, is_split_size}. The scalars' names carry the sample
count (FID-5K): they are not the papers' FID-50K. Precision and recall are not computed in
the loop (they need the reference images' features and are slow); use `--mode=evaluate` on
exported samples for the full table. `check_requirements` checks at the start of training
what the first evaluation would otherwise find hours later.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator

import numpy as np

from udit_jax import config as config_lib
from udit_jax import sampler as sampler_lib
from udit_jax.evaluation import metrics as M
from udit_jax.evaluation import reference as R
from udit_jax.evaluation.inception_weights import load_inception_variables
from udit_jax.evaluation.evaluate import Evaluator, metric_names


@functools.lru_cache(maxsize=2)
def _evaluator(reference_npz: str, inception_weights: str, preprocess: str, batch_size: int,
               fid_method: str, is_split_size: int) -> Evaluator:
    """Built once per setting: weights, reference statistics and compiled network are reused."""
    return Evaluator(reference_npz, inception_weights, preprocess=preprocess,
                     batch_size=batch_size, fid_method=fid_method, is_split_size=is_split_size,
                     progress=False)


class InTrainingEvaluation:
    """The sampler and the scorer of in-loop evaluation for one model on one mesh."""

    def __init__(self, config, model, mesh):
        ev = config.eval
        M.check_split(ev.in_loop_num_samples, ev.is_split_size)
        self.ev = ev
        seed = config_lib.sampling(config, "eval")["seed"]
        self.sampler, self.vae_params = config_lib.make_sampler(config, model, mesh, "eval")
        self.key = sampler_lib.noise_key(seed)
        self.labels = sampler_lib.random_labels(seed, ev.in_loop_num_samples,
                                                config.data.num_classes)

    def images(self, ema_params) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches of the evaluation images (one channel repeated to RGB)."""
        indices = np.arange(len(self.labels), dtype=np.int32)
        for x in self.sampler.host_batches(ema_params, self.vae_params, self.key, self.labels,
                                           indices, self.ev.sample_batch):
            img = sampler_lib.quantize(x)
            yield np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img

    def __call__(self, ema_params, step: int) -> dict[str, float]:
        """{"FID-5K", "sFID-5K", "IS-5K"} (named by the count) of the EMA params' images."""
        ev = self.ev
        evaluator = _evaluator(str(ev.reference_npz), str(ev.inception_weights), ev.preprocess,
                               ev.batch_size, ev.fid_method, ev.is_split_size)
        acts = evaluator.features.from_batches(self.images(ema_params), len(self.labels),
                                               f"eval step {step}", progress=False)
        scores = evaluator.score(acts, with_pr=False)
        return {name: scores[k] for k, name in metric_names(len(self.labels)).items()}


def check_requirements(config) -> None:
    """Raises ValueError / FileNotFoundError when in-loop evaluation could not run: the
    reference batch and Inception weights (named: config.validate) present and readable, the
    sample count valid for the IS split, the VAE weights present for a latent model."""
    ev = config.eval
    M.check_split(ev.in_loop_num_samples, ev.is_split_size)
    if not os.path.isfile(ev.reference_npz):
        raise FileNotFoundError(f"config.eval.reference_npz={ev.reference_npz} not found (the ADM "
                                "reference batch, e.g. VIRTUAL_imagenet256_labeled.npz)")
    keys = R.npz_keys(ev.reference_npz)
    if R.IMAGES_KEY not in keys and R.load_statistics(ev.reference_npz) is None:
        raise ValueError(f"config.eval.reference_npz={ev.reference_npz} holds neither images "
                         f"(arr_0) nor statistics (mu, sigma, mu_s, sigma_s); keys: {keys}")
    load_inception_variables(ev.inception_weights)
    if config_lib.is_latent(config):
        sampler_lib.check_vae_weights(config.vae.weights)


def evaluate_during_training(config, model, ema_params, step: int, mesh=None) -> dict[str, float]:
    """One-off InTrainingEvaluation(config, model, mesh or config's mesh)(ema_params, step)."""
    mesh = config_lib.make_mesh(config) if mesh is None else mesh
    return InTrainingEvaluation(config, model, mesh)(ema_params, step)
