"""Sample quality on Fashion-MNIST: a small classifier the project trains itself, and a score.

    classifier = fashion_mnist_quality.load_or_train_classifier()   # trained once, then cached
    score = classifier.score(images, labels)   # images uint8 [N, 28 or 32, same, 1 or 3], labels [N]
    print(score.format_table())                # recognised % per class and overall, FD, accuracy

The score of samples drawn for given classes: the fraction the classifier recognises as the
class they were drawn for (per class and overall), and the Frechet distance between the
classifier's penultimate features of the samples and of the Fashion-MNIST test split. The
classifier's own test accuracy is reported beside it, so the recognised fraction means
something (a real test image is recognised as often as the classifier is right).

The classifier (two strided 3x3 convolutions and two dense layers, 0.1M params; three epochs
of AdamW) trains in well under a minute on 2 cores (36 s). Training is deterministic for a
given data set, architecture, recipe and seed; the result (params, test accuracy, test feature
statistics) is cached under $UDIT_JAX_CACHE, else $XDG_CACHE_HOME/udit_jax, else
~/.cache/udit_jax, in a file named by a fingerprint of all four, so it is trained once per
machine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import tempfile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from udit_jax import paths
from udit_jax.data.sources import FASHION_MNIST_CLASSES, FashionMnistSource
from udit_jax.evaluation import metrics

IMAGE_SIDE = 28
NUM_CLASSES = len(FASHION_MNIST_CLASSES)
# Bumped whenever the network or the training code changes what a trained classifier is.
CLASSIFIER_VERSION = 1
RECIPE = dict(epochs=3, batch_size=128, learning_rate=3e-3, weight_decay=1e-4)


class ClassifierCNN(nn.Module):
    """[B, 28, 28, 1] float in [-1, 1] -> (logits [B, 10], features [B, feature_dim])."""
    widths: tuple[int, int] = (16, 32)
    feature_dim: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for width in self.widths:   # 28 -> 14 -> 7
            x = nn.relu(nn.Conv(width, (3, 3), strides=2, padding="SAME")(x))
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return nn.Dense(NUM_CLASSES)(features), features


def to_classifier_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, C] (S in 28..32 as the demo pads 28 -> 32, C in {1, 3}) -> float32
    [N, 28, 28, 1] in [-1, 1]: centre crop to 28x28, RGB averaged to grey."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be [N, S, S, 1 or 3] uint8, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    side = images.shape[1]
    if not IMAGE_SIDE <= side <= IMAGE_SIDE + 4:
        raise ValueError(f"{side}x{side} images are not Fashion-MNIST sized (28x28, or padded "
                         "to at most 32x32)")
    top = (side - IMAGE_SIDE) // 2   # as data.preprocess.pad_to centres them
    x = images[:, top:top + IMAGE_SIDE, top:top + IMAGE_SIDE].astype(np.float32)
    return (x.mean(axis=-1, keepdims=True) / 127.5 - 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QualityScore:
    """The score of n samples: recognised fractions and FD to the test split."""
    n: int
    recognised: float                 # fraction of all samples classified as their class
    per_class: np.ndarray             # [10] fraction per class (NaN for classes not drawn)
    counts: np.ndarray                # [10] samples per class
    frechet_distance: float           # classifier features vs the test split
    classifier_accuracy: float        # the classifier's test accuracy

    def scalars(self) -> dict[str, float]:
        """Flat {name: value} for TensorBoard: recognised, fd, classifier_accuracy and
        recognised/<class name> (characters TensorBoard refuses in tags become '_')."""
        out = {"recognised": self.recognised, "fd": self.frechet_distance,
               "classifier_accuracy": self.classifier_accuracy}
        for name, value, count in zip(FASHION_MNIST_CLASSES, self.per_class, self.counts):
            if count:
                out["recognised/" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)] = float(value)
        return out

    def summary(self) -> str:
        """One line: recognised %, worst class, FD, n and the classifier's accuracy."""
        drawn = self.counts > 0
        worst = int(np.argmin(np.where(drawn, self.per_class, np.inf)))
        return (f"recognised {100 * self.recognised:.1f}% (worst: {FASHION_MNIST_CLASSES[worst]} "
                f"{100 * self.per_class[worst]:.0f}%), FD {self.frechet_distance:.2f} "
                f"(n={self.n}; Fashion-MNIST classifier, test accuracy "
                f"{100 * self.classifier_accuracy:.1f}%)")

    def format_table(self) -> str:
        lines = [f"{'class':<12} {'n':>5} {'recognised':>10}"]
        for name, value, count in zip(FASHION_MNIST_CLASSES, self.per_class, self.counts):
            if count:
                lines.append(f"{name:<12} {int(count):>5} {100 * value:>9.1f}%")
        lines.append(f"{'all':<12} {self.n:>5} {100 * self.recognised:>9.1f}%")
        lines.append(f"Frechet distance to the test split (classifier features): "
                     f"{self.frechet_distance:.3f}")
        lines.append(f"classifier test accuracy: {100 * self.classifier_accuracy:.2f}%")
        return "\n".join(lines)


class FashionMnistClassifier:
    """A trained ClassifierCNN with its test accuracy and test-split feature statistics."""

    def __init__(self, model: ClassifierCNN, params, test_accuracy: float,
                 test_statistics: metrics.Statistics):
        self.model = model
        self.params = params
        self.test_accuracy = float(test_accuracy)
        self.test_statistics = test_statistics
        self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def logits_and_features(self, images: np.ndarray, batch: int = 500):
        """uint8 images (see to_classifier_input) -> (logits [N, 10], features [N, D]) float32."""
        return _batched(self._apply, self.params, to_classifier_input(images), batch)

    def score(self, images: np.ndarray, labels: np.ndarray) -> QualityScore:
        """images uint8 [N, S, S, C] drawn for classes labels [N] (N >= 2)."""
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(images) or len(labels) < 2:
            raise ValueError(f"need at least 2 images with one label each; got {len(images)} "
                             f"images and {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"labels must be Fashion-MNIST classes 0..{NUM_CLASSES - 1}")
        logits, features = self.logits_and_features(images)
        hit = (logits.argmax(-1) == labels).astype(np.float64)
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        hits = np.bincount(labels, weights=hit, minlength=NUM_CLASSES)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
        fd = metrics.frechet_distance(metrics.feature_statistics(features), self.test_statistics,
                                      method="eigh")
        return QualityScore(n=len(labels), recognised=float(hit.mean()), per_class=per_class,
                            counts=counts, frechet_distance=max(fd, 0.0),
                            classifier_accuracy=self.test_accuracy)


def grid_images(grid: np.ndarray, rows: int) -> np.ndarray:
    """A preview grid [rows*S, cols*S, C] (one row per class, square tiles) -> [rows*cols, S, S, C]
    in row-major order."""
    side = grid.shape[0] // rows
    if grid.ndim != 3 or side * rows != grid.shape[0] or grid.shape[1] % side:
        raise ValueError(f"a grid of {rows} rows of square tiles cannot have shape {grid.shape}")
    cols = grid.shape[1] // side
    tiles = grid.reshape(rows, side, cols, side, grid.shape[2]).transpose(0, 2, 1, 3, 4)
    return tiles.reshape(rows * cols, side, side, grid.shape[2])


class PreviewScorer:
    """Scores the training loop's preview grids: score(grid, classes) -> QualityScore."""

    def __init__(self, classifier: FashionMnistClassifier):
        self.classifier = classifier

    def __call__(self, grid: np.ndarray, classes) -> QualityScore:
        images = grid_images(grid, len(classes))
        labels = np.repeat(np.asarray(list(classes)), len(images) // len(classes))
        return self.classifier.score(images, labels)


def scorer_from_config(config) -> PreviewScorer | None:
    """The preview scorer config.eval.quality asks for (None when it is ""), built before
    training so a missing data set or a bad setting fails early."""
    quality = config.eval.get("quality", "")
    if not quality:
        return None
    check_quality_config(config)
    return PreviewScorer(load_or_train_classifier(config.data.get("dir") or None))


def check_quality_config(config) -> None:
    if config.eval.quality != "fashion_mnist":
        raise ValueError(f"eval.quality={config.eval.quality!r}; use 'fashion_mnist' or ''")
    if config.data.source != "fashion_mnist" or config.data.space != "pixel":
        raise ValueError("eval.quality='fashion_mnist' scores Fashion-MNIST pixel samples; the "
                         f"config trains on data.source={config.data.source!r} in "
                         f"data.space={config.data.space!r}. Set eval.quality=''")


def evaluate_npz(sample_npz, data_dir: str | None = None,
                 classifier: FashionMnistClassifier | None = None) -> QualityScore:
    """Scores a sample .npz (arr_0 uint8 [N, S, S, C], arr_1 labels [N]) and prints the table
    (with `classifier`, or the one load_or_train_classifier(data_dir) gives)."""
    if not os.path.exists(sample_npz):
        raise FileNotFoundError(f"sample file {sample_npz} not found")
    try:
        with np.load(sample_npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("arr_0", "arr_1")}
    except (ValueError, OSError) as e:   # not an .npz at all, or one holding pickled objects
        raise ValueError(f"{sample_npz} is not a sample .npz (arr_0 uint8 images, arr_1 labels, "
                         f"as --mode=sample writes): {type(e).__name__}") from e
    if set(arrays) != {"arr_0", "arr_1"}:
        raise ValueError(f"{sample_npz} has no {'arr_1 (class labels)' if 'arr_0' in arrays else 'arr_0 (images)'}"
                         "; sample it with --mode=sample, which stores images and labels")
    images, labels = arrays["arr_0"], arrays["arr_1"]
    score = (classifier or load_or_train_classifier(data_dir)).score(images, labels)
    print(f"Fashion-MNIST sample quality of {sample_npz}:\n{score.format_table()}")
    return score


def _batched(apply, params, x: np.ndarray, batch: int):
    """apply(params, x) over x in fixed-size batches (the last one padded: one compile)."""
    logits, features = [], []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = batch - len(chunk) if len(x) > batch else 0
        out = apply(params, np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0))))
        logits.append(np.asarray(out[0])[:len(chunk)])
        features.append(np.asarray(out[1])[:len(chunk)])
    return np.concatenate(logits), np.concatenate(features)


# ----------------------------------------------------------------------------- training

def train_params(model: ClassifierCNN, images: np.ndarray, labels: np.ndarray, seed: int,
                 epochs: int, batch_size: int, learning_rate: float, weight_decay: float):
    """AdamW with a cosine schedule over `epochs` shuffled passes, one jitted step per batch.

    images float32 [N, 28, 28, 1] in [-1, 1], labels int [N]. Deterministic given the seed.
    (Not a scan over the epoch: XLA's CPU backend ran the step inside a loop about 7x slower,
    without its fast convolution and matmul paths; 90 s of the demo's first run.)
    """
    batch_size = min(batch_size, len(images))   # a tiny data folder still trains
    steps_per_epoch = len(images) // batch_size
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    params = jax.jit(lambda k: model.init(k, images[:1])["params"])(init_key)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits, _ = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n = steps_per_epoch * batch_size
    for e in range(epochs):
        order = rng.permutation(len(images))[:n].reshape(steps_per_epoch, batch_size)
        losses = []
        for batch in order:
            params, opt_state, loss = step(params, opt_state, images[batch], labels[batch])
            losses.append(loss)
        logging.info("Fashion-MNIST classifier: epoch %d/%d, train loss %.4f", e + 1, epochs,
                     float(jnp.mean(jnp.stack(losses))))
    return params


def _fingerprint(model: ClassifierCNN, recipe: dict, seed: int, train: FashionMnistSource,
                 test: FashionMnistSource) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CLASSIFIER_VERSION, "model": repr(model), "recipe": recipe,
                         "seed": seed}, sort_keys=True).encode())
    for source in (train, test):
        h.update(source.images.tobytes())
        h.update(source.labels.tobytes())
    return h.hexdigest()[:16]


def load_or_train_classifier(data_dir: str | None = None, cache_dir: str | os.PathLike | None = None,
                             seed: int = 0, model: ClassifierCNN | None = None,
                             recipe: dict | None = None) -> FashionMnistClassifier:
    """The classifier for the Fashion-MNIST files in data_dir (default: the Debian package's),
    loaded from cache_dir (default: paths.user_cache_dir()) or trained there once (under a
    minute on a CPU)."""
    model = model or ClassifierCNN()
    recipe = dict(RECIPE, **(recipe or {}))
    train = FashionMnistSource(data_dir, split="train")
    test = FashionMnistSource(data_dir, split="test")
    fingerprint = _fingerprint(model, recipe, seed, train, test)
    path = pathlib.Path(cache_dir or paths.user_cache_dir()) / f"fashion_mnist_classifier-{fingerprint}.npz"
    if path.exists():
        with np.load(path) as f:
            params = flax.traverse_util.unflatten_dict(
                {tuple(k.split("/")): f[k] for k in f.files if k.startswith("params/")})["params"]
            return FashionMnistClassifier(model, params, float(f["test_accuracy"]),
                                          metrics.Statistics(f["test_mu"], f["test_sigma"]))
    logging.info("training the Fashion-MNIST quality classifier (once; cached in %s)", path)
    params = train_params(model, to_classifier_input(train.images), train.labels, seed, **recipe)
    params = jax.tree.map(np.asarray, params)
    classifier = FashionMnistClassifier(model, params, 0.0, None)
    logits, features = classifier.logits_and_features(test.images)
    classifier.test_accuracy = float(np.mean(logits.argmax(-1) == test.labels))
    classifier.test_statistics = metrics.feature_statistics(features)
    logging.info("Fashion-MNIST classifier: test accuracy %.2f%%", 100 * classifier.test_accuracy)
    _save(path, classifier)
    return classifier


def _save(path: pathlib.Path, classifier: FashionMnistClassifier) -> None:
    """Written to a temporary file and renamed, so concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(("params",) + k): v
            for k, v in flax.traverse_util.flatten_dict(classifier.params).items()}
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, **flat, test_accuracy=classifier.test_accuracy,
                 test_mu=classifier.test_statistics.mu, test_sigma=classifier.test_statistics.sigma)
    os.replace(f.name, path)
