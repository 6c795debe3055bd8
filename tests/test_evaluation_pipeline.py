"""ADM batch files, sharded feature extraction and end-to-end scoring (evaluate_npz)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import FIXTURES, REPO_ROOT, assert_close_rel, load_npz, xla_flags
from udit_jax.evaluation import metrics as M
from udit_jax.evaluation import reference as R
from udit_jax.evaluation.evaluate import Evaluator, evaluate_npz, evaluate_from_config
from udit_jax.evaluation.preprocess import check_images
from udit_jax import config as config_lib

WEIGHTS = FIXTURES / "eval" / "inception_fid_weights.npz"
REL = 1e-4


@pytest.fixture(scope="module")
def io():
    return load_npz("eval/inception_fid_io.npz")


@pytest.fixture(scope="module")
def sizes():
    return json.loads((FIXTURES / "eval" / "manifest.json").read_text())["config"]["sizes"]


def resized_size(sizes):
    return next(s for s in sizes if s != 299)


def rows(array, idx):
    """array[idx] with the indices taken modulo its length: fixture sets differ in images per run."""
    return array[[i % len(array) for i in idx]]


# ----------------------------------------------------------------------------- batch files

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_images_stream_in_batches(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    save(path, arr_0=images, labels=np.arange(7))
    info = R.image_array_info(path)
    assert (info.count, info.resolution) == (7, (5, 6))
    batches = list(R.iter_images(path, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    gray = tmp_path / "gray.npz"   # sample.py's layout for 1-channel (Fashion-MNIST) models
    save(gray, arr_0=images[..., :1])
    np.testing.assert_array_equal(np.concatenate(list(R.iter_images(gray, batch_size=3))),
                                  np.broadcast_to(images[..., :1], images.shape))


def test_statistics_files(tmp_path):
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(6, 2048)).astype(np.float32)
    spatial = rng.normal(size=(6, 2023)).astype(np.float32)
    path = tmp_path / "ref.npz"
    R.write_reference(path, pool, spatial)
    stats = R.load_statistics(path)
    np.testing.assert_array_equal(stats[0].mu, pool.mean(0))
    np.testing.assert_allclose(stats[1].sigma, np.cov(spatial.astype(np.float64), rowvar=False),
                               rtol=1e-10)
    assert "arr_0" not in R.npz_keys(path)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=stats[0].mu, sigma=stats[0].sigma)
    with pytest.raises(ValueError, match="lacks"):
        R.load_statistics(partial)
    images_only = tmp_path / "images.npz"
    np.savez(images_only, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert R.load_statistics(images_only) is None
    with pytest.raises(FileNotFoundError):
        R.load_statistics(tmp_path / "missing.npz")


def test_bad_images_are_refused(tmp_path):
    good = np.zeros((2, 8, 8, 3), np.uint8)
    check_images(good)
    with pytest.raises(ValueError, match="uint8"):
        check_images(good.astype(np.float32) / 127.5 - 1)  # model-range floats
    with pytest.raises(ValueError, match="uint8"):
        check_images(good.astype(np.int32) + 300)
    with pytest.raises(ValueError, match="channels"):
        check_images(good[..., :1])
    with pytest.raises(ValueError, match="channels"):
        check_images(good.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="NHWC"):
        check_images(good[0])
    path = tmp_path / "floats.npz"
    np.savez(path, arr_0=good.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        next(R.iter_images(path))


def test_evaluate_refuses_bad_input_before_computing(tmp_path, io, sizes):
    size = resized_size(sizes)
    images = io[f"images_{size}"]
    sample = tmp_path / "sample.npz"
    np.savez(sample, arr_0=rows(images, [0, 1, 2, 0, 1]))
    other_res = tmp_path / "ref_299.npz"
    np.savez(other_res, arr_0=np.zeros((5, 299 if size != 299 else 256, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="reference batch of the sample resolution"):
        evaluate_npz(sample, other_res, WEIGHTS, progress=False)
    two_channels = tmp_path / "two_channels.npz"
    np.savez(two_channels, arr_0=images[..., :2])
    with pytest.raises(ValueError, match="channels"):
        evaluate_npz(two_channels, other_res, WEIGHTS, progress=False)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images)
    with pytest.raises(ValueError, match="single sample"):
        evaluate_npz(sample, ref, WEIGHTS, is_split_size=2, progress=False)  # 2, 2, 1
    three = tmp_path / "three.npz"
    np.savez(three, arr_0=rows(images, [0, 1, 2]))
    with pytest.raises(ValueError, match="at least 4 samples"):
        evaluate_npz(three, ref, WEIGHTS, progress=False)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        evaluate_npz(sample, ref, tmp_path / "nope.pth", progress=False)
    bad_stats = tmp_path / "stats64.npz"
    np.savez(bad_stats, mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(64), sigma_s=np.eye(64))
    with pytest.raises(ValueError, match="2048"):
        evaluate_npz(sample, bad_stats, WEIGHTS, progress=False)


# ----------------------------------------------------------------------------- end to end

def test_evaluator_and_evaluate_npz(tmp_path, io, sizes):
    """Features streamed through the sharded extractor equal pytorch-fid's (fixture rows),
    stored reference statistics are used as stored, computed ones come from arr_0, and the
    metrics are the metric functions of those features."""
    size = resized_size(sizes)
    images = io[f"images_{size}"]
    s_idx, r_idx = [i % len(images) for i in (0, 1, 2, 1, 0)], [i % len(images) for i in (2, 0, 1, 2)]
    sample, ref_stats, ref_images = (tmp_path / n for n in ("s.npz", "r1.npz", "r2.npz"))
    np.savez(sample, arr_0=images[s_idx])
    np.savez(ref_images, arr_0=images[r_idx])
    # Stored statistics deliberately from other features than arr_0's.
    stored = (M.feature_statistics(rows(io[f"pfid_{size}/pool3"], [0, 1, 2, 0]) * 1.1),
              M.feature_statistics(rows(io[f"pfid_{size}/spatial_adm"], [0, 1, 2, 0]) * 1.1))
    np.savez(ref_stats, arr_0=images[r_idx], mu=stored[0].mu, sigma=stored[0].sigma,
             mu_s=stored[1].mu, sigma_s=stored[1].sigma)

    ev = Evaluator(ref_stats, WEIGHTS, batch_size=4, read_batch=3, progress=False)
    assert ev.stats_source == "stored"
    np.testing.assert_array_equal(ev.reference_stats[0].sigma, stored[0].sigma)
    np.testing.assert_array_equal(ev.reference_stats[1].mu, stored[1].mu)
    assert_close_rel(ev.reference_acts.pool3, io[f"tf1_{size}/pool3"][r_idx], REL, "ref pool3")
    acts = ev.sample_activations(R.iter_images(sample, 3))
    assert_close_rel(acts.pool3, io[f"tf1_{size}/pool3"][s_idx], REL, "pool3")
    assert_close_rel(acts.spatial, io[f"tf1_{size}/spatial_adm"][s_idx], REL, "spatial")
    assert_close_rel(acts.probs, io[f"tf1_{size}/softmax_unbiased"][s_idx], REL, "probs")

    # Through the CLI entry point, statistics computed from arr_0.
    config = config_lib.base_config()
    config.eval.update({
        "sample_npz": str(sample), "reference_npz": str(ref_images),
        "inception_weights": str(WEIGHTS), "batch_size": 4, "fid_method": "eigh"})
    result = evaluate_from_config(config, tmp_path / "work")
    written = json.loads((tmp_path / "work" / "eval" / "s.json").read_text())
    assert written == result
    assert result["reference_statistics"] == "computed"
    assert (result["num_samples"], result["num_reference"]) == (5, 4)
    np.testing.assert_allclose(result["inception_score"], M.inception_score(acts.probs), rtol=1e-5)
    fid = M.frechet_distance(M.feature_statistics(acts.pool3),
                             M.feature_statistics(ev.reference_acts.pool3), method="eigh")
    np.testing.assert_allclose(result["fid"], fid, rtol=1e-3)
    pr = M.precision_recall(ev.reference_acts.pool3, acts.pool3)
    assert (result["precision"], result["recall"]) == (pr.precision, pr.recall)


def test_features_sharded_over_eight_devices(io, sizes):
    """8 host devices, the fixture's images padded to 8: each device holds one row; results equal the
    fixture rows whatever the padding and layout."""
    size = resized_size(sizes)
    script = textwrap.dedent(f"""
        import numpy as np, jax
        jax.config.update("jax_default_matmul_precision", "highest")
        assert jax.device_count() == 8, jax.devices()
        from udit_jax.evaluation import InceptionFeatures, load_inception_variables
        from udit_jax import parallel
        io = np.load({str(FIXTURES / 'eval' / 'inception_fid_io.npz')!r})
        feats = InceptionFeatures(load_inception_variables({str(WEIGHTS)!r}), "pytorch_fid",
                                  batch_size=8, mesh=parallel.make_mesh(4, 2))
        out = feats(io["images_{size}"])
        for key, ref in (("pool3", "pool3"), ("spatial", "spatial_adm"),
                         ("probs", "softmax_unbiased")):
            expected = io["pfid_{size}/" + ref]
            err = np.abs(getattr(out, key) - expected).max() / max(1.0, np.abs(expected).max())
            assert err <= {REL}, (key, err)
        print("OK", out.pool3.shape)
    """)
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OK ({len(io[f'images_{size}'])}, 2048)" in proc.stdout


@pytest.mark.slow  # ~40 s on 2 idle cores: two 2048-d matrix square roots plus sampling
def test_evaluate_during_training(tmp_path, io, sizes):
    """The training hook samples from a tiny pixel-space DiT and scores the images: its
    numbers equal the metric functions applied to the same images' features, and the images
    are the sampler's for the evaluation seed's labels and keys."""
    import jax
    from udit_jax import models, sampler
    from udit_jax.evaluation import in_training

    config = config_lib.base_config()
    config.data.space = "pixel"
    config.data.num_classes = 4
    model = models.build_model("DiT", input_size=8, patch_size=4, in_channels=3, hidden_size=32,
                               depth=1, num_heads=2, num_classes=4)
    params = models.init_params(model, jax.random.key(0))
    ref = tmp_path / "ref.npz"
    size = resized_size(sizes)
    stats = (M.feature_statistics(rows(io[f"tf1_{size}/pool3"], [0, 1, 2, 0])),
             M.feature_statistics(rows(io[f"tf1_{size}/spatial_adm"], [0, 1, 2, 0])))
    np.savez(ref, mu=stats[0].mu, sigma=stats[0].sigma, mu_s=stats[1].mu, sigma_s=stats[1].sigma)
    config.eval.update({
        "reference_npz": str(ref), "inception_weights": str(WEIGHTS), "in_loop_num_samples": 3,
        "steps": "2",
        "sample_batch": 2, "batch_size": 4, "fid_method": "eigh", "seed": 5})

    scores = in_training.evaluate_during_training(config, model, params, step=7)
    assert set(scores) == {"FID-3", "sFID-3", "IS-3"}   # names carry the sample count

    # The same images, drawn again by the sampler with the evaluation's labels and keys.
    labels = sampler.random_labels(5, 3, 4)
    images = sampler.quantize(sampler.sample_images(
        model, params, config_lib.make_diffusion(config, "2"), labels, sampler.noise_key(5)))
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    ev = in_training._evaluator(str(ref), str(WEIGHTS), "adm", 4, "eigh", 5000)
    acts = ev.features(images)
    np.testing.assert_allclose(scores["IS-3"], M.inception_score(acts.probs), rtol=1e-5)
    np.testing.assert_allclose(
        scores["FID-3"], M.frechet_distance(M.feature_statistics(acts.pool3), stats[0], method="eigh"),
        rtol=1e-4)
