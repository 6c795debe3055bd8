"""FID / sFID, Inception Score and precision/recall against ADM's evaluator (fixtures in
../shared/fixtures/eval: eval_metrics_*.npz, produced by ADM's own code; see its README §5)."""

import re

import jax
import numpy as np
import pytest

from conftest import load_npz
from udit_jax.evaluation import metrics as M


@pytest.fixture(scope="module")
def fid():
    return load_npz("eval/eval_metrics_fid.npz")


@pytest.fixture(scope="module")
def is_case():
    return load_npz("eval/eval_metrics_is.npz")


@pytest.fixture(scope="module")
def pr():
    return load_npz("eval/eval_metrics_pr.npz")


def cases(data, suffix):
    return sorted({k[: -len(suffix)] for k in data if k.endswith(suffix)})


# ----------------------------------------------------------------------------- FID / sFID

def test_statistics_and_frechet_distance(fid):
    names = cases(fid, "/feats_a")
    assert names  # small, spatial, lowrank
    for c in names:
        a = M.feature_statistics(fid[f"{c}/feats_a"])
        b = M.feature_statistics(fid[f"{c}/feats_b"])
        assert a.mu.dtype == np.float32 and a.sigma.dtype == np.float64  # ADM's dtypes
        np.testing.assert_array_equal(a.mu, fid[f"{c}/mu_a"])
        np.testing.assert_array_equal(b.mu, fid[f"{c}/mu_b"])
        np.testing.assert_allclose(a.sigma, fid[f"{c}/sigma_a"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(b.sigma, fid[f"{c}/sigma_b"], rtol=1e-12, atol=1e-14)
        terms = M.frechet_terms(a, b)
        assert terms["mean_term"].dtype == np.float32  # both means float32 -> float32 term
        np.testing.assert_allclose(terms["mean_term"], fid[f"{c}/mean_term"], rtol=1e-6)
        for key in ("trace_a", "trace_b"):
            np.testing.assert_allclose(terms[key], fid[f"{c}/{key}"], rtol=1e-10, err_msg=key)
        # sqrtm's iterations round differently with the host's BLAS kernels (3e-10 seen on
        # an AVX2 host); still 1000x tighter than the FID check below.
        np.testing.assert_allclose(terms["tr_covmean"], fid[f"{c}/tr_covmean"], rtol=1e-8)
        assert terms["fallback_used"] == bool(fid[f"{c}/fallback_used"])
        np.testing.assert_allclose(M.frechet_distance(a, b), fid[f"{c}/fid"], rtol=1e-5, err_msg=c)
        # And from the stored statistics.
        stored = M.frechet_distance(M.Statistics(fid[f"{c}/mu_a"], fid[f"{c}/sigma_a"]),
                                    M.Statistics(fid[f"{c}/mu_b"], fid[f"{c}/sigma_b"]))
        np.testing.assert_allclose(stored, fid[f"{c}/fid"], rtol=1e-5)
        np.testing.assert_allclose(stored, fid[f"{c}/fid_alt_eigh_float64"], rtol=1e-5)


def test_frechet_distance_symmetric_route(fid):
    # The fast "eigh" route is the fixture's independent float64 evaluation (README section 5).
    for c in cases(fid, "/feats_a"):
        a = M.Statistics(fid[f"{c}/mu_a"], fid[f"{c}/sigma_a"])
        b = M.Statistics(fid[f"{c}/mu_b"], fid[f"{c}/sigma_b"])
        np.testing.assert_allclose(M.frechet_distance(a, b, method="eigh"),
                                   fid[f"{c}/fid_alt_eigh_float64"], rtol=1e-6, err_msg=c)
        np.testing.assert_allclose(M.frechet_distance(a, b, method="eigh"), fid[f"{c}/fid"],
                                   rtol=1e-5, err_msg=c)


def test_frechet_distance_with_float64_reference_mean(fid):
    # A stored reference mu in float64 makes the mean term float64 (numpy promotion).
    a = M.Statistics(fid["small/mu_a"], fid["small/sigma_a"])
    ref = M.Statistics(fid["small/ref_mu_float64"], fid["small/sigma_b"])
    assert M.frechet_terms(a, ref)["mean_term"].dtype == np.float64
    np.testing.assert_allclose(M.frechet_distance(a, ref), fid["small/fid_vs_float64_ref_stats"],
                               rtol=1e-5)


def test_frechet_distance_is_zero_for_identical_statistics(fid):
    a = M.feature_statistics(fid["small/feats_a"])
    assert abs(M.frechet_distance(a, a)) < 1e-6


def test_statistics_refuse_bad_input(fid):
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.feature_statistics(fid["small/feats_a"][:1])
    with pytest.raises(ValueError, match="float32"):
        M.feature_statistics(fid["small/feats_a"].astype(np.float64))
    a = M.feature_statistics(fid["small/feats_a"])
    b = M.feature_statistics(fid["spatial/feats_a"])
    with pytest.raises(ValueError, match="do not match"):
        M.frechet_distance(a, b)


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_from_pool3(is_case):
    w = load_npz("eval/inception_fid_weights.npz")["fc.weight"].astype(np.float32)
    feats = is_case["feats"].astype(np.float32)
    logits = np.asarray(jax.jit(lambda f, k: f @ k)(feats, w.T))
    probs = np.asarray(M.class_probabilities(logits))
    np.testing.assert_allclose(probs, is_case["softmax"], rtol=1e-5, atol=1e-7)
    splits = [int(m.group(1)) for k in is_case if (m := re.fullmatch(r"is_split(\d+)", k))]
    assert splits
    for s in splits:
        per_split = M.split_scores(probs, s)
        assert per_split.dtype == np.float32
        assert len(per_split) == len(is_case[f"is_split{s}/split_lengths"])
        np.testing.assert_allclose(per_split, is_case[f"is_split{s}/per_split"], rtol=1e-5)
        np.testing.assert_allclose(M.inception_score(probs, s), is_case[f"is_split{s}"],
                                   rtol=1e-5, err_msg=f"split {s}")


def test_inception_score_split_rule_on_probabilities(is_case):
    """Fed the same float32 probabilities, the numpy part is ADM's arithmetic exactly."""
    probs = is_case["probs_only/probs"]
    splits = [int(m.group(1)) for k in is_case
              if (m := re.fullmatch(r"probs_only/is_split(\d+)", k))]
    assert splits
    for s in splits:
        np.testing.assert_allclose(M.inception_score(probs, s),
                                   is_case[f"probs_only/is_split{s}"], rtol=1e-6, err_msg=str(s))


def test_inception_score_closed_forms():
    k = 10
    # Every sample certain of a different class: exp(log K) = K. All identical: 1.
    one_hot = np.full((k, k), 1e-30, np.float32) + np.eye(k, dtype=np.float32)
    one_hot /= one_hot.sum(1, keepdims=True)
    assert M.inception_score(one_hot) == pytest.approx(k, rel=1e-5)
    same = np.tile(np.linspace(1, 2, k, dtype=np.float32) / 15, (6, 1))
    assert M.inception_score(same) == pytest.approx(1.0, abs=1e-6)


def test_inception_score_refuses_one_sample_splits():
    probs = np.full((11, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="single sample"):
        M.inception_score(probs, split_size=5)  # splits 5, 5, 1
    with pytest.raises(ValueError, match="single sample"):
        M.inception_score(probs[:1])
    with pytest.raises(ValueError, match="split_size"):
        M.inception_score(probs, split_size=0)
    assert M.inception_score(probs, split_size=4) == pytest.approx(1.0)  # 4, 4, 3


# ----------------------------------------------------------------------------- precision / recall

def pr_inputs(pr, c):
    # pr_2048 is stored as float16 and used as float32 (README §5).
    return pr[f"{c}/ref"].astype(np.float32), pr[f"{c}/sample"].astype(np.float32)


def test_precision_recall_float64_is_exact(pr):
    for c in cases(pr, "/ref"):
        ref, sample = pr_inputs(pr, c)
        out = M.precision_recall(ref, sample, distance="float64")
        np.testing.assert_allclose(out.radii_ref, pr[f"{c}/radii_ref_float64"], rtol=1e-9)
        np.testing.assert_allclose(out.radii_sample, pr[f"{c}/radii_sample_float64"], rtol=1e-9)
        assert out.precision == pr[f"{c}/precision_float64"], c
        assert out.recall == pr[f"{c}/recall_float64"], c


def test_precision_recall_float16_matches_adm(pr):
    """ADM's float16 distance block, emulated. README §5: exact parity is not possible in
    general (kernels differ by build), so flags may flip on near-ties: a few out of N."""
    for c in cases(pr, "/ref"):
        ref, sample = pr_inputs(pr, c)
        dist = M.PairwiseDistances("float16")
        d = dist.block(dist.prepare(ref), dist.prepare(sample), ref, sample)
        expected = pr[f"{c}/dist_ref_sample"]
        rtol = 2e-3 if np.all(np.isfinite(ref.astype(np.float16) ** 2)) else 1e-5
        np.testing.assert_allclose(d, expected, rtol=rtol, atol=1e-6, err_msg=c)
        out = M.precision_recall(ref, sample, distance="float16")
        np.testing.assert_allclose(out.radii_ref, pr[f"{c}/radii_ref"][:, 0], rtol=rtol)
        np.testing.assert_allclose(out.radii_sample, pr[f"{c}/radii_sample"][:, 0], rtol=rtol)
        assert abs(out.precision - pr[f"{c}/precision"]) <= 2 / len(sample) + 1e-12, c
        assert abs(out.recall - pr[f"{c}/recall"]) <= 2 / len(ref) + 1e-12, c
        flips = (np.sum(out.sample_in_ref_manifold != pr[f"{c}/sample_in_ref_manifold"])
                 + np.sum(out.ref_in_sample_manifold != pr[f"{c}/ref_in_sample_manifold"]))
        assert flips <= 2, c


def test_float16_distances_mostly_bit_exact(pr):
    """The emulated kernel reproduces ADM's float16 distances bit for bit almost everywhere
    (README: >= 99.98 % on the build that made the fixtures)."""
    checked = 0
    for c in cases(pr, "/ref"):
        ref, sample = pr_inputs(pr, c)
        with np.errstate(over="ignore"):
            if not np.all(np.isfinite(np.sum(ref.astype(np.float16) ** 2, 1))):
                continue  # float32 fallback block: not a float16 computation
        dist = M.PairwiseDistances("float16")
        d = dist.block(dist.prepare(ref), dist.prepare(sample), ref, sample)
        assert np.mean(d == pr[f"{c}/dist_ref_sample"]) >= 0.999, c
        checked += 1
    assert checked


def test_float16_overflow_falls_back_to_float32(pr):
    c = "pr_overflow"
    ref, sample = pr_inputs(pr, c)
    dist = M.PairwiseDistances("float16")
    d = dist.block(dist.prepare(ref), dist.prepare(sample), ref, sample)
    exact = ((ref[:, None, :].astype(np.float64) - sample[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-5)  # float32 accuracy, not float16's 1e-3
    assert d.dtype == np.float32


def test_precision_recall_closed_form():
    # Identical sets: every point lies in its own ball, so precision = recall = 1; a far
    # shifted copy is in no ball: 0.
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    for mode in M.DISTANCE_MODES:
        same = M.precision_recall(x, x, distance=mode)
        assert (same.precision, same.recall) == (1.0, 1.0)
        far = M.precision_recall(x, x + 100, distance=mode)
        assert (far.precision, far.recall) == (0.0, 0.0)


def test_block_size_does_not_change_results(pr):
    ref, sample = pr_inputs(pr, "pr_small")
    whole = M.precision_recall(ref, sample, distance="float64")
    tiled = M.precision_recall(ref, sample, distance="float64", block=64)
    assert (whole.precision, whole.recall) == (tiled.precision, tiled.recall)
    np.testing.assert_array_equal(whole.radii_ref, tiled.radii_ref)


def test_precision_recall_refuses_bad_input():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="at least 4"):
        M.precision_recall(x[:3], x)
    with pytest.raises(ValueError, match="dims"):
        M.precision_recall(x, np.zeros((10, 5), np.float32))
    with pytest.raises(ValueError, match="distance mode"):
        M.precision_recall(x, x, distance="bfloat16")
