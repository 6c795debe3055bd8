"""Sample-quality metrics as the papers compute them (ADM's evaluator), in JAX.

    from udit_jax import evaluation
    metrics = evaluation.evaluate_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz",
                                      inception_weights="pt_inception-2015-12-05-6726825d.pth")

    variables = evaluation.load_inception_variables(path)      # pytorch-fid weights
    feats = evaluation.InceptionFeatures(variables)(images_u8)  # pool3, spatial, probs
    evaluation.frechet_distance(evaluation.feature_statistics(feats.pool3), ref_stats)

    # reference statistics of a training dataset (config.data: class folders, tfds, Fashion-MNIST)
    evaluation.write_dataset_reference(config, "ref.npz", inception_weights, max_images=50_000)

    python -m udit_jax.main --mode=evaluate ...   # score config.eval.sample_npz, or sample
                                                  # config.eval.num_samples from the export
                                                  # first; or write a dataset reference

    # Fashion-MNIST (the demo): recognised % per class and FD in a small classifier's features
    from udit_jax.evaluation import fashion_mnist_quality
    score = fashion_mnist_quality.load_or_train_classifier().score(images_u8, labels)

Modules: inception (network), inception_weights (its weights; `convert_inception` is the
command line that makes a torch-free copy), preprocess (ADM / pytorch-fid
resize), metrics (FID, sFID, IS, precision/recall), features (sharded extraction),
reference (ADM .npz files), dataset_reference (reference statistics of a training dataset),
evaluate (end-to-end scoring, `--mode=evaluate`, from a sample .npz or an export), in_training
(sampling + scoring every config.eval_every_steps), fashion_mnist_quality (the demo's
recognised fraction and FD, config.eval.quality).
"""

from udit_jax.evaluation.inception_weights import (inception_key_specs,
                                                   inception_variables_from_torch,
                                                   load_inception_variables)
from udit_jax.evaluation.dataset_reference import write_dataset_reference
from udit_jax.evaluation.evaluate import (Evaluator, evaluate_from_config, evaluate_npz,
                                          format_table)
from udit_jax.evaluation.features import Activations, InceptionFeatures
from udit_jax.evaluation.in_training import evaluate_during_training
from udit_jax.evaluation.inception import InceptionV3
from udit_jax.evaluation.metrics import (PrecisionRecall, Statistics, feature_statistics,
                                         frechet_distance, inception_score, manifold_radii,
                                         precision_recall)
from udit_jax.evaluation.preprocess import check_images, preprocess
from udit_jax.evaluation.reference import (iter_images, load_statistics, write_reference,
                                           write_statistics)

__all__ = [
    "Activations", "Evaluator", "InceptionFeatures", "InceptionV3", "PrecisionRecall",
    "Statistics", "check_images", "evaluate_during_training", "evaluate_from_config",
    "evaluate_npz", "feature_statistics", "format_table",
    "frechet_distance", "inception_key_specs", "inception_score", "inception_variables_from_torch",
    "iter_images", "load_inception_variables", "load_statistics", "manifold_radii",
    "precision_recall", "preprocess", "write_dataset_reference", "write_reference",
    "write_statistics",
]
