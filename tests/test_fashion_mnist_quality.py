"""The Fashion-MNIST sample-quality metric: the project's classifier and its score.

The classifier is trained once per machine (cached by fingerprint under the tests' own cache,
$UDIT_JAX_CACHE from conftest.py), so only the first session pays its training (about a minute
of CPU).
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from udit_jax.data.preprocess import pad_to
from udit_jax.data.sources import FASHION_MNIST_DIR, FashionMnistSource
from udit_jax.evaluation import fashion_mnist_quality as Q
from udit_jax.evaluation import metrics

needs_data = pytest.mark.skipif(not pathlib.Path(FASHION_MNIST_DIR).is_dir(),
                                reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="session")
def classifier():
    return Q.load_or_train_classifier()


@pytest.fixture(scope="session")
def train_split():
    return FashionMnistSource(None, "train")


def balanced(source, per_class: int):
    """The first per_class images of each class, padded to 32x32 as the demo sees them."""
    idx = np.concatenate([np.flatnonzero(source.labels == k)[:per_class] for k in range(10)])
    return np.stack([pad_to(x, 32) for x in source.images[idx]]), source.labels[idx]


@needs_data
def test_classifier_reaches_88_percent_test_accuracy(classifier):
    assert classifier.test_accuracy >= 0.88


@needs_data
def test_real_images_are_recognised_with_fd_near_zero(classifier, train_split):
    # Training-split images (not the test split the FD compares with), 100 per class.
    images, labels = balanced(train_split, 100)
    real = classifier.score(images, labels)
    assert real.recognised >= 0.88
    assert np.all(real.per_class >= 0.6), real.format_table()
    noise = classifier.score(np.random.default_rng(0).integers(0, 256, images.shape, np.uint8),
                             labels)
    # n=1000 in 64 dims: the finite-sample bias of the real FD is small next to noise's.
    assert real.frechet_distance < 0.02 * noise.frechet_distance, (real.summary(), noise.summary())
    assert 0.0 <= noise.recognised <= 0.2, noise.format_table()


@needs_data
def test_cached_classifier_is_reloaded_unchanged(classifier):
    again = Q.load_or_train_classifier()
    assert again.test_accuracy == classifier.test_accuracy
    for a, b in zip(_leaves(again.params), _leaves(classifier.params)):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_training_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    model = Q.ClassifierCNN(widths=(4, 8), feature_dim=8)
    runs = [Q.train_params(model, x, y, seed=3, epochs=2, batch_size=16, learning_rate=1e-2,
                           weight_decay=0.0) for _ in range(2)]
    for a, b in zip(_leaves(runs[0]), _leaves(runs[1])):
        np.testing.assert_array_equal(a, b)


def test_grid_images_inverts_the_preview_layout():
    # The training loop's grid: row r, column c holds image r * cols + c.
    tiles = np.arange(6 * 4 * 4 * 1, dtype=np.uint8).reshape(6, 4, 4, 1)
    grid = np.zeros((2 * 4, 3 * 4, 1), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, 3)
        grid[4 * r:4 * r + 4, 4 * c:4 * c + 4] = tile
    np.testing.assert_array_equal(Q.grid_images(grid, rows=2), tiles)


def test_score_counts_per_class():
    # A stub classifier that calls every image class 0: class 0 is recognised, others are not.
    clf = Q.FashionMnistClassifier(Q.ClassifierCNN(), None, 0.9,
                                   metrics.Statistics(np.zeros(3, np.float32), np.eye(3)))
    features = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    clf.logits_and_features = lambda images: (np.tile(np.eye(10)[0], (len(images), 1)), features)
    labels = np.array([0, 0, 1, 2, 2, 2])
    score = clf.score(np.zeros((6, 32, 32, 1), np.uint8), labels)
    assert score.recognised == pytest.approx(2 / 6)
    np.testing.assert_array_equal(score.counts[:3], [2, 1, 3])
    np.testing.assert_allclose(score.per_class[:3], [1.0, 0.0, 0.0])
    assert np.isnan(score.per_class[3:]).all()


def test_bad_images_are_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\[N, S, S, 1 or 3\] uint8"):
        Q.to_classifier_input(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="not Fashion-MNIST sized"):
        Q.to_classifier_input(np.zeros((2, 64, 64, 1), np.uint8))


def test_bad_sample_files_name_the_file(tmp_path):
    """Before the classifier is loaded: a missing file, a file that is no .npz (numpy's own
    message advised loading pickles), and one without labels."""
    with pytest.raises(FileNotFoundError, match="sample file .*missing.npz not found"):
        Q.evaluate_npz(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"garbage.npz is not a sample .npz \(arr_0 uint8 images"):
        Q.evaluate_npz(tmp_path / "garbage.npz")
    np.savez(tmp_path / "images_only.npz", np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match=r"images_only.npz has no arr_1 \(class labels\)"):
        Q.evaluate_npz(tmp_path / "images_only.npz")


@needs_data
def test_preview_scorer_reads_the_training_grid(classifier, train_split):
    # A preview grid as train.make_sampler lays it out: one row per class, 4 per row.
    images, labels = balanced(train_split, 4)
    grid = images.reshape(10, 4, 32, 32, 1).transpose(0, 2, 1, 3, 4).reshape(320, 128, 1)
    score = Q.PreviewScorer(classifier)(grid, classes=list(range(10)))
    np.testing.assert_array_equal(score.counts, np.full(10, 4))
    assert score.recognised == classifier.score(images, labels).recognised


def test_quality_setting_refuses_other_data():
    from udit_jax import config as config_lib
    config = config_lib.base_config()
    config.eval.quality = "fashion_mnist"
    with pytest.raises(ValueError, match="scores Fashion-MNIST pixel samples"):
        Q.scorer_from_config(config)
    config.eval.quality = "cifar"
    with pytest.raises(ValueError, match="use 'fashion_mnist' or ''"):
        Q.scorer_from_config(config)


@needs_data
def test_evaluate_mode_prints_the_table_for_a_sample_npz(classifier, train_split, tmp_path, capsys):
    from udit_jax import config as config_lib
    from udit_jax.evaluation import evaluate_from_config
    images, labels = balanced(train_split, 10)
    np.savez(tmp_path / "samples.npz", images, labels)   # arr_0, arr_1 as --mode=sample writes
    config = config_lib.base_config()
    config.data.source, config.data.space = "fashion_mnist", "pixel"
    config.eval.quality = "fashion_mnist"
    config.eval.sample_npz = str(tmp_path / "samples.npz")
    result = evaluate_from_config(config, tmp_path)
    assert result["recognised"] == classifier.score(images, labels).recognised
    table = capsys.readouterr().out
    assert "Ankle boot" in table and "classifier test accuracy" in table
    # Written like the ADM scores: <workdir>/eval/<sample stem>.json.
    written = json.loads((tmp_path / "eval" / "samples.json").read_text())
    assert written == result and written["sample_path"] == str(tmp_path / "samples.npz")
