"""--mode=evaluate beyond a given sample file: reference statistics of a training dataset
(class folders, Fashion-MNIST) and scoring an export (sampled first).

Every Inception call here runs on [8, 32, 32, 3] uint8 batches, so one compilation serves the
file.
"""

import gzip
import json

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, assert_close_rel
from udit_jax import config as config_lib
from udit_jax.data.preprocess import center_crop_arr
from udit_jax.evaluation import metrics as M
from udit_jax.evaluation import reference as R
from udit_jax.evaluation.inception_weights import load_inception_variables
from udit_jax.evaluation.evaluate import evaluate_from_config
from udit_jax.evaluation.features import InceptionFeatures

WEIGHTS = FIXTURES / "eval" / "inception_fid_weights.npz"
SIZE = 32
BATCH = 8
REL = 1e-5


@pytest.fixture(scope="module")
def features():
    return InceptionFeatures(load_inception_variables(WEIGHTS), "adm", batch_size=BATCH)


def eval_config(data: dict, **eval_fields) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.data.update(data)
    config.eval.update(dict(inception_weights=str(WEIGHTS), batch_size=BATCH, **eval_fields))
    return config


def assert_statistics_of(path, images: np.ndarray, features) -> None:
    """The file's statistics are those of `images`' features, computed directly."""
    acts = features(images)
    stored = R.load_statistics(path)
    for st, feats, what in ((stored[0], acts.pool3, "pool3"), (stored[1], acts.spatial, "spatial")):
        expected = M.feature_statistics(feats)
        assert st.mu.dtype == np.float32 and st.sigma.dtype == np.float64
        assert_close_rel(st.mu, expected.mu, REL, f"{what} mu")
        assert_close_rel(st.sigma, expected.sigma, REL, f"{what} sigma")


def test_class_folder_reference(tmp_path, features):
    """ADM centre crops of every readable file (RGB, grayscale, RGBA, other sizes) in
    ImageFolder order; an unreadable file is skipped; a subset holds distinct dataset images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    expected = []
    for c, cls in enumerate(["b_class", "a_class"]):   # labels follow sorted names
        (root / cls).mkdir(parents=True)
        for i, (w, h, mode) in enumerate([(45, 37, "RGB"), (33, 70, "L"), (80, 64, "RGBA"),
                                          (32, 32, "RGB")]):
            pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(
                root / cls / f"{i}.png")
    (root / "a_class" / "9_broken.png").write_bytes(b"not a png")
    for cls in ["a_class", "b_class"]:
        for i in range(4):
            expected.append(center_crop_arr(Image.open(root / cls / f"{i}.png").convert("RGB"),
                                            SIZE))
    expected = np.stack(expected)

    out = tmp_path / "ref.npz"
    config = eval_config({"source": "folder", "dir": str(root), "image_size": SIZE},
                         write_reference_to=str(out), reference_with_images=True)
    summary = evaluate_from_config(config, tmp_path / "work")
    assert (summary["num_images"], summary["num_unreadable"]) == (8, 1)
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], expected)
    assert_statistics_of(out, expected, features)

    config.eval.update(write_reference_to=str(tmp_path / "subset.npz"), reference_max_images=3)
    summary = evaluate_from_config(config, tmp_path / "work")
    assert summary["num_images"] + summary["num_unreadable"] == 3   # 3 items, read or skipped
    with np.load(tmp_path / "subset.npz") as f:
        rows = [int(np.flatnonzero((expected == img).all(axis=(1, 2, 3)))[0]) for img in f["arr_0"]]
    assert len(set(rows)) == summary["num_images"]


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reference_is_padded_and_rgb(tmp_path, features):
    """28x28 grayscale items centred on a black SIZE canvas (as the pixel loader pads them)
    and repeated to RGB (as grayscale samples are read for scoring)."""
    rng = np.random.default_rng(1)
    digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", digits, 0x803)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5), 0x801)
    expected = np.zeros((5, SIZE, SIZE, 3), np.uint8)
    off = (SIZE - 28) // 2
    expected[:, off:off + 28, off:off + 28] = digits[..., None]

    out = tmp_path / "fmnist_ref.npz"
    config = eval_config({"source": "fashion_mnist", "dir": str(tmp_path), "image_size": SIZE},
                         write_reference_to=str(out), reference_with_images=True)
    evaluate_from_config(config, tmp_path / "work")
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"], expected)
    assert_statistics_of(out, expected, features)


def test_evaluate_an_export(tmp_path, features):
    """No sample_npz: num_samples images are sampled from the export (DDIM, few steps), scored,
    and the metrics are those of the sampled images' features."""
    import flax.linen as nn
    from udit_jax import export, models
    from udit_jax.models.info import abstract_params

    model = models.build_model("DiT", input_size=SIZE, patch_size=8, in_channels=3,
                               hidden_size=32, depth=1, num_heads=2, num_classes=4,
                               learn_sigma=True)
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                          nn.unbox(abstract_params(model)))
    workdir = tmp_path / "work"
    export.write_export(workdir / "export", model, params,
                        diffusion={"noise_schedule": "linear", "diffusion_steps": 1000,
                                   "learn_sigma": True},
                        data={"space": "pixel", "image_size": SIZE, "channels": 3,
                              "num_classes": 4, "latent_scale": 0.18215},
                        vae=None, metadata={"source": "test"})
    ref_feats = rng.normal(size=(4, 2048 + 2023)).astype(np.float32)
    ref = tmp_path / "ref.npz"
    R.write_reference(ref, ref_feats[:, :2048], ref_feats[:, 2048:])
    config = eval_config({}, reference_npz=str(ref), num_samples=5, sampler="ddim", steps="2",
                         cfg_scale=1.0, seed=3, fid_method="eigh")

    result = evaluate_from_config(config, workdir)
    written = json.loads((workdir / "eval" / "ddim-2-cfg1-seed3-float32-5.json").read_text())
    assert written == result
    assert result["num_samples"] == 5 and result["precision"] is None
    job = json.loads((workdir / "eval" / "samples" / "ddim-2-cfg1-seed3-float32-5" / "job.json").read_text())
    assert (job["sampler"], job["steps"], job["seed"], job["num_images"]) == ("ddim", "2", 3, 5)
    with np.load(result["sample_path"]) as f:
        images = f["arr_0"]
    assert images.shape == (5, SIZE, SIZE, 3) and images.std() > 0
    acts = features(images)
    for name in ("fid", "sfid", "inception_score"):
        assert np.isfinite(result[name]), name
    np.testing.assert_allclose(result["inception_score"], M.inception_score(acts.probs), rtol=1e-5)
    stored = R.load_statistics(ref)
    np.testing.assert_allclose(
        result["fid"], M.frechet_distance(M.feature_statistics(acts.pool3), stored[0],
                                          method="eigh"), rtol=1e-4)

    with pytest.raises(ValueError, match="single sample"):   # checked before sampling
        config.eval.update(num_samples=6, is_split_size=5)
        evaluate_from_config(config, workdir)
