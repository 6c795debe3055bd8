"""FID / sFID, Inception Score and k-NN precision/recall with ADM's arithmetic.

Every number here is computed the way ADM's `evaluator.py` (guided-diffusion, shipped with
DiT and U-DiT) computes it, so scores are comparable with the papers:

  statistics   mu = mean of float32 features (numpy, hence float32); sigma = unbiased
               covariance in float64.
  Frechet      |mu1 - mu2|^2 (float32 when both means are float32) + tr S1 + tr S2
               - 2 tr sqrtm(S1 S2), with scipy's sqrtm of the non-symmetric product; eps*I
               added to both covariances if the root is not finite; complex roots are accepted
               when the diagonal's imaginary part is below 1e-3 (the real part is used).
  IS           consecutive splits of `split_size` (the last may be shorter and counts the same),
               exp(mean KL(p || mean p)) per split, mean over splits, in float32.
  PR           squared Euclidean distances; radius = distance to the 3rd nearest other point;
               precision = share of samples inside some reference ball, recall = share of
               reference points inside some sample ball; blocks of 10000 x 10000.

ADM evaluates the distances in float16 (falling back to float32 for a block with a
non-finite entry). `distance="float16"` reproduces that kernel as measured on TF's CPU
build (see `_norms_f16`); GPU TF kernels round differently, so exact agreement with ADM's
published precision/recall is not possible in general: expect a few points out of N to flip.
`distance="float64"` gives the exact answer; "float32" is the fast approximate middle.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

DISTANCE_MODES = ("float16", "float32", "float64")
PR_BLOCK = 10000       # ADM's row/column batch: the float16 -> float32 fallback is per block
PR_NEIGHBOURS = 3      # k of the k-NN radius
IS_SPLIT_SIZE = 5000
FID_EPS = 1e-6
FRECHET_METHODS = ("sqrtm", "eigh")


# ----------------------------------------------------------------------------- FID / sFID

@dataclasses.dataclass(frozen=True)
class Statistics:
    """Gaussian fit of a feature set: mu [D], sigma [D, D]."""
    mu: np.ndarray
    sigma: np.ndarray


def feature_statistics(features: np.ndarray) -> Statistics:
    """features: [N, D] float32 (N >= 2) -> Statistics(mu float32, sigma float64)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    if features.dtype != np.float32:
        raise ValueError(f"features must be float32 (ADM's mean is taken in float32), "
                         f"got {features.dtype}")
    return Statistics(np.mean(features, axis=0), np.cov(features, rowvar=False))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) through symmetric eigendecompositions
    (float64); negative round-off eigenvalues count as 0."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None))))


def frechet_terms(a: Statistics, b: Statistics, eps: float = FID_EPS,
                  method: str = "sqrtm") -> dict:
    """The parts of the Frechet distance: mean_term, trace_a, trace_b, tr_covmean, and
    covmean_max_imag / fallback_used describing the matrix square root.

    method "sqrtm" is ADM's (scipy's Schur square root of the non-symmetric product, with its
    eps fallback and imaginary-part check); "eigh" is the symmetric route, about 2x faster
    at 2048 dims and within ~1e-7 relative of it (for scoring inside a training loop)."""
    if method not in FRECHET_METHODS:
        raise ValueError(f"unknown Frechet method {method!r}; use one of {FRECHET_METHODS}")
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{s1.shape} vs {s2.shape}. Both sides must come from the same "
                         "features (pool3: 2048, spatial: 2023 at 299x299 input)")
    diff = mu1 - mu2
    if method == "eigh":
        return {"mean_term": diff.dot(diff), "trace_a": np.trace(s1), "trace_b": np.trace(s2),
                "tr_covmean": _trace_sqrt_product_eigh(s1, s2), "covmean_max_imag": 0.0,
                "fallback_used": False}
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    fallback = not np.isfinite(covmean).all()
    if fallback:  # nearly singular product: regularise both covariances, as ADM does
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    max_imag = 0.0
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("Frechet distance: sqrtm(S1 S2) has an imaginary diagonal part of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are "
                             "degenerate (too few samples for the feature size?)")
        max_imag = float(np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    return {"mean_term": diff.dot(diff), "trace_a": np.trace(s1), "trace_b": np.trace(s2),
            "tr_covmean": np.trace(covmean), "covmean_max_imag": max_imag,
            "fallback_used": fallback}


def frechet_distance(a: Statistics, b: Statistics, eps: float = FID_EPS,
                     method: str = "sqrtm") -> float:
    """FID (pool3 statistics) or sFID (spatial statistics) between two Statistics."""
    t = frechet_terms(a, b, eps, method)
    return float(t["mean_term"] + t["trace_a"] + t["trace_b"] - 2 * t["tr_covmean"])


# ----------------------------------------------------------------------------- Inception Score

@jax.jit
def class_probabilities(logits_unbiased: jax.Array) -> jax.Array:
    """softmax in float32 of the bias-free logits (pool3 @ fc.kernel), ADM's IS input."""
    return jax.nn.softmax(logits_unbiased.astype(jnp.float32), axis=-1)


def check_split(n: int, split_size: int) -> None:
    """Raises unless ADM's split rule gives every split >= 2 of the n samples: a 1-sample
    split scores exactly 1 whatever the samples, and ADM would average that in."""
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    if n < 2 or n % split_size == 1:
        raise ValueError(
            f"Inception Score of {n} samples with split_size {split_size}: the splits are "
            f"consecutive runs of {split_size} and the last holds the rest, so one split would "
            "hold a single sample (its score is always 1); use more samples, a sample count "
            "with N mod split_size != 1, or another split_size")


def split_scores(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> np.ndarray:
    """Per-split Inception Scores (float32) of probs [N, K] under ADM's split rule."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"class probabilities must be [N, K], got shape {probs.shape}")
    n = probs.shape[0]
    check_split(n, split_size)
    scores = []
    for start in range(0, n, split_size):
        part = probs[start:start + split_size]
        marginal = np.mean(part, axis=0)[None]
        kl = np.mean(np.sum(part * (np.log(part) - np.log(marginal)), axis=1))
        scores.append(np.exp(kl))
    return np.asarray(scores)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: mean of the split scores (every split weighs the same)."""
    return float(np.mean(split_scores(probs, split_size)))


# ----------------------------------------------------------------------------- distances

def _round16(x) -> np.ndarray:
    return np.asarray(x, np.float16)


def _sum_lanes_f32(lanes: np.ndarray) -> np.ndarray:
    """Horizontal sum of 8 float16 lanes [..., 8] in float32 (AVX order), rounded to float16."""
    f = lanes.astype(np.float32)
    half = f[..., :4] + f[..., 4:]
    return _round16((half[..., 0] + half[..., 2]) + (half[..., 1] + half[..., 3]))


def _leaf_sum_f16(sq: np.ndarray) -> np.ndarray:
    """Eigen's vectorised float16 sum of each row of sq [R, n]: four accumulators of 8 lanes
    over whole 32-element groups, combined 0+1, +2, +3; then whole 8-element groups; lanes
    summed in float32; plus the sequential sum of the last n mod 8 elements."""
    rows, n = sq.shape
    n32, n8 = n // 32 * 32, n // 8 * 8
    acc = np.zeros((rows, 4, 8), np.float16)
    for j in range(0, n32, 32):
        acc = acc + sq[:, j:j + 32].reshape(rows, 4, 8)
    packet = ((acc[:, 0] + acc[:, 1]) + acc[:, 2]) + acc[:, 3]
    for j in range(n32, n8, 8):
        packet = packet + sq[:, j:j + 8]
    tail = np.zeros((rows,), np.float16)
    for j in range(n8, n):
        tail = tail + sq[:, j]
    return tail + _sum_lanes_f32(packet)


def _tree_sum_f16(sq: np.ndarray, first: int) -> np.ndarray:
    """Eigen's tree reduction: spans longer than 8 lanes x 200 (Eigen's leaf size for half)
    are cut at a packet-aligned midpoint (relative to the flat index `first`) and the halves
    added. At D = 2048 this is the README's "two halves of 1024"; other D > 1600 follow the
    same rule unverified."""
    n = sq.shape[1]
    if n <= 8 * 200:
        return _leaf_sum_f16(sq)
    split = 8 * (-(-(first + -(-n // 2)) // 8))
    left = min(split - first, n)
    total = _tree_sum_f16(sq[:, :left], first)
    if left < n:
        total = total + _tree_sum_f16(sq[:, left:], first + left)
    return total


def _norms_f16(x: np.ndarray) -> np.ndarray:
    """Squared row norms of float16 x [N, D] as TF's CPU reduce_sum(square(x), 1) in float16
    computes them (measured on TF 2.21 / AVX-512; fixture README section 5)."""
    n, d = x.shape
    out = np.empty((n,), np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # inf norms trigger the fallback
        sq = x * x  # float16 products, each rounded once
        # A row's flat start index (row * D) decides where long rows are cut: group by it.
        for offset in range(8):
            rows = np.nonzero((np.arange(n) * d) % 8 == offset)[0]
            if rows.size:
                out[rows] = _tree_sum_f16(sq[rows], offset)
    return out


@functools.partial(jax.jit, static_argnames="dtype")
def _inner_products_jit(u, v, dtype):
    return jnp.dot(u.astype(dtype), v.astype(dtype).T, precision="highest")


def _inner_products(u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
    """u @ v.T on the default device, in float32 or (with x64 switched on locally) float64."""
    if dtype == np.float64:
        with jax.enable_x64(True):
            return np.asarray(_inner_products_jit(u.astype(np.float64), v.astype(np.float64),
                                                  jnp.float64))
    return np.asarray(_inner_products_jit(u, v, jnp.float32))


def _distances_f32(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    nu = np.sum(np.square(u), axis=1)[:, None]
    nv = np.sum(np.square(v), axis=1)[None, :]
    return np.maximum(nu - 2 * _inner_products(u, v, np.float32) + nv, np.float32(0))


class PairwiseDistances:
    """Squared Euclidean distances between feature blocks, in one of DISTANCE_MODES.

    The float16 mode follows ADM's DistanceBlock: features cast to float16, norms as
    `_norms_f16`, inner products rounded once to float16, then
    max(round16(round16(|u|^2 - 2 u.v) + |v|^2), 0); a block with any non-finite entry is
    recomputed in float32. Row norms are computed once per feature set.
    """

    def __init__(self, mode: str = "float16"):
        if mode not in DISTANCE_MODES:
            raise ValueError(f"unknown distance mode {mode!r}; use one of {DISTANCE_MODES}")
        self.mode = mode

    def prepare(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features in the mode's dtype, their squared norms)."""
        features = np.asarray(features)
        if self.mode == "float16":
            with np.errstate(over="ignore"):  # values beyond 65504 become inf: fallback
                x = features.astype(np.float16)
            return x, _norms_f16(x)
        x = features.astype(np.float64 if self.mode == "float64" else np.float32)
        return x, np.sum(x * x, axis=1)

    def block(self, u: tuple, v: tuple, u_raw: np.ndarray, v_raw: np.ndarray) -> np.ndarray:
        """[len(u), len(v)] distances (float32; float64 in float64 mode). u, v: `prepare`d
        blocks; *_raw: the float32 features, for the float32 fallback."""
        (xu, nu), (xv, nv) = u, v
        if self.mode == "float64":
            d = nu[:, None] - 2 * _inner_products(xu, xv, np.float64) + nv[None, :]
            return np.maximum(d, 0.0)
        if self.mode == "float32":
            d = nu[:, None] - 2 * _inner_products(xu, xv, np.float32) + nv[None, :]
            return np.maximum(d, np.float32(0))
        with np.errstate(over="ignore", invalid="ignore"):
            # float16 inputs: float64 products and sums are (near) exact, rounded once.
            ip = _round16(_inner_products(xu, xv, np.float64))
            d = (nu[:, None] - 2 * ip) + nv[None, :]
            d = np.where(np.isnan(d), d, np.maximum(d, np.float16(0)))
        if np.isfinite(d).all():
            return d.astype(np.float32)
        return _distances_f32(np.asarray(u_raw, np.float32), np.asarray(v_raw, np.float32))


# ----------------------------------------------------------------------------- precision / recall

@dataclasses.dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    radii_ref: np.ndarray              # [N_ref]
    radii_sample: np.ndarray           # [N_sample]
    sample_in_ref_manifold: np.ndarray  # [N_sample] bool; mean = precision
    ref_in_sample_manifold: np.ndarray  # [N_ref] bool; mean = recall


def _check_pr_features(x: np.ndarray, what: str, k: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} features must be [N, D], got shape {x.shape}")
    if x.shape[0] < k + 1:
        raise ValueError(f"{what}: {x.shape[0]} points; the {k}-NN radius needs at least "
                         f"{k + 1}")
    return x.astype(np.float32)


def manifold_radii(features: np.ndarray, distance: str = "float16", k: int = PR_NEIGHBOURS,
                   block: int = PR_BLOCK) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point: [N]."""
    features = _check_pr_features(features, "manifold", k)
    dist = PairwiseDistances(distance)
    n = len(features)
    prepared = [dist.prepare(features[s:s + block]) for s in range(0, n, block)]
    radii = []
    for i, rows in enumerate(prepared):
        r_raw = features[i * block:(i + 1) * block]
        row = np.concatenate([dist.block(rows, cols, r_raw, features[j * block:(j + 1) * block])
                              for j, cols in enumerate(prepared)], axis=1)
        radii.append(np.partition(row, k, axis=1)[:, k])  # position 0 is the point itself
    return np.concatenate(radii)


def precision_recall(ref: np.ndarray, sample: np.ndarray, distance: str = "float16",
                     k: int = PR_NEIGHBOURS, block: int = PR_BLOCK) -> PrecisionRecall:
    """Improved precision/recall (Kynkaanniemi et al.) as ADM's compute_prec_recall.

    ref: [N_ref, D] reference features (ADM: pool3 of the reference batch);
    sample: [N_sample, D]. distance: "float16" (ADM), "float32" or "float64" (exact).
    """
    ref = _check_pr_features(ref, "reference", k)
    sample = _check_pr_features(sample, "sample", k)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"reference features have {ref.shape[1]} dims, samples "
                         f"{sample.shape[1]}")
    radii_ref = manifold_radii(ref, distance, k, block)
    radii_sample = manifold_radii(sample, distance, k, block)
    dist = PairwiseDistances(distance)
    ref_in = np.zeros(len(ref), bool)
    sample_in = np.zeros(len(sample), bool)
    sample_blocks = [(s, dist.prepare(sample[s:s + block])) for s in range(0, len(sample), block)]
    for r in range(0, len(ref), block):
        rows = dist.prepare(ref[r:r + block])
        for s, cols in sample_blocks:
            d = dist.block(rows, cols, ref[r:r + block], sample[s:s + block])
            ref_in[r:r + block] |= np.any(d <= radii_sample[None, s:s + block], axis=1)
            sample_in[s:s + block] |= np.any(d <= radii_ref[r:r + block, None], axis=0)
    return PrecisionRecall(float(np.mean(sample_in)), float(np.mean(ref_in)), radii_ref,
                           radii_sample, sample_in, ref_in)
