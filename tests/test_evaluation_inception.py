"""FID Inception: weight conversion, both preprocessing conventions, and the network's outputs
against pytorch-fid's (fixtures in ../shared/fixtures/eval, random weights, see its README)."""

import json

import jax
import numpy as np
import pytest

from conftest import FIXTURES, assert_close_rel, load_npz
from udit_jax.convert.common import ConversionError
from udit_jax.evaluation import (inception_key_specs, inception_variables_from_torch,
                                 load_inception_variables)
from udit_jax.evaluation.inception import STAGES, InceptionV3
from udit_jax.evaluation.preprocess import preprocess

EVAL = "eval/"
REL = 1e-4  # the bound: 1e-4 of max(1, max|expected|)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "eval" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def state_dict():
    return load_npz(EVAL + "inception_fid_weights.npz")


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception_variables_from_torch(state_dict)


@pytest.fixture(scope="module")
def io():
    return load_npz(EVAL + "inception_fid_io.npz")


@pytest.fixture(scope="module")
def acts():
    return load_npz(EVAL + "inception_fid_activations.npz")


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


# ----------------------------------------------------------------------------- conversion

def test_every_state_dict_key_converts(state_dict, variables):
    specs = inception_key_specs()
    mapped = {s.torch_key for s in specs}
    counters = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    assert len(state_dict) == 566
    assert len(mapped) == len(specs)
    assert mapped | counters == set(state_dict) and not mapped & counters
    n_values = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(variables))
    assert n_values == sum(state_dict[k].size for k in mapped)
    # Layouts: conv (O, I, kh, kw) -> HWIO, fc (out, in) -> (in, out), BN statistics as stored.
    conv = variables["params"]["Mixed_6d"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(conv, state_dict["Mixed_6d.branch7x7_2.conv.weight"]
                                  .astype(np.float32).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"],
                                  state_dict["fc.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_4a_3x3"]["bn"]["var"],
                                  state_dict["Conv2d_4a_3x3.bn.running_var"].astype(np.float32))
    assert all(l.dtype == np.float32 for l in jax.tree_util.tree_leaves(variables))


def test_conversion_refuses_wrong_state_dicts(state_dict):
    missing = dict(state_dict)
    del missing["Mixed_7c.branch_pool.bn.running_mean"]
    with pytest.raises(ConversionError, match="Mixed_7c.branch_pool.bn.running_mean"):
        inception_variables_from_torch(missing)
    extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ConversionError, match="AuxLogits.fc.weight"):
        inception_variables_from_torch(extra)
    wrong = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ConversionError, match="fc.weight"):
        inception_variables_from_torch(wrong)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception_variables(tmp_path / "pt_inception.pth")


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("mode, tag", [("adm", "tf1"), ("pytorch_fid", "pfid")])
def test_preprocessing_matches_reference_kernels(manifest, io, mode, tag):
    for size in manifest["config"]["sizes"]:
        images = io[f"images_{size}"]
        x = np.asarray(preprocess(images, mode))
        if f"{tag}_{size}/net_input" in io:
            expected = nhwc(io[f"{tag}_{size}/net_input"])
        else:  # at 299 both resizes are the identity (README section 2); not stored
            assert size == 299
            u = images.astype(np.float32)
            expected = (u - 128) / 128 if mode == "adm" else 2 * (u / 255) - 1
        assert x.shape == expected.shape == (len(images), 299, 299, 3)
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-5, err_msg=f"{mode} {size}")


def reference_resize(u8, mode):
    """README section 2's formulas, separable (W, then H): source coordinates in float32 as
    both kernels evaluate them (at ~400 px a float32 coordinate is off by up to 3e-5), the
    blend in float64."""
    x = u8.astype(np.float64) / (255.0 if mode == "pytorch_fid" else 1.0)
    for axis in (2, 1):
        size = x.shape[axis]
        i = np.arange(299, dtype=np.float32)
        scale = np.float32(size) / np.float32(299)
        src = i * scale if mode == "adm" else np.maximum((i + np.float32(0.5)) * scale
                                                         - np.float32(0.5), np.float32(0))
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, size - 1)
        lam = (src.astype(np.float64) - i0).reshape([-1 if a == axis else 1 for a in range(4)])
        x = np.take(x, i0, axis) * (1 - lam) + np.take(x, i1, axis) * lam
    return (x - 128) / 128 if mode == "adm" else 2 * x - 1


@pytest.mark.parametrize("mode", ["adm", "pytorch_fid"])
@pytest.mark.parametrize("shape", [(2, 64, 80, 3), (1, 401, 347, 3)])  # up- and downscaling
def test_preprocessing_formulas_any_size(mode, shape):
    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(preprocess(images, mode)), reference_resize(images, mode),
                               rtol=0, atol=1e-5)


def test_conventions_differ_when_resizing(io, manifest):
    # Guards against one mode silently doing the other's resize.
    size = next(s for s in manifest["config"]["sizes"] if s != 299)
    a = np.asarray(preprocess(io[f"images_{size}"], "adm"))
    p = np.asarray(preprocess(io[f"images_{size}"], "pytorch_fid"))
    assert np.abs(a - p).max() > 1e-3


# ----------------------------------------------------------------------------- network

def test_each_stage_alone_on_debug_input(variables, acts):
    """Every block fed the reference output of the block before it (README section 4)."""
    bound = InceptionV3().bind(variables)
    x = nhwc(acts["debug/input"])
    for name in STAGES:
        expected = nhwc(acts[f"debug/{name}"])
        y = np.asarray(jax.jit(lambda h, n=name: bound.stage(n, h))(x))
        assert_close_rel(y, expected, REL, f"debug/{name}")
        x = expected


def test_debug_forward_outputs(variables, acts):
    out = jax.jit(InceptionV3().apply)(variables, nhwc(acts["debug/input"]))
    for key, ref in [("pool3", "pool3"), ("logits", "logits"),
                     ("logits_unbiased", "logits_unbiased"), ("spatial", "spatial_adm")]:
        assert_close_rel(out[key], acts[f"debug/{ref}"], REL, f"debug/{ref}")
    # The sFID layer is Mixed_6d.branch1x1 = Mixed_6d's first 192 channels (README section 3).
    branch = nhwc(acts["debug/Mixed_6d.branch1x1"])
    assert_close_rel(np.asarray(out["spatial"]), branch[..., :7].reshape(1, -1), REL, "spatial")


def test_full_forward_all_runs(variables, io, acts, manifest):
    """pool3, logits, softmax, sFID features and every block's channel means at 299x299, for
    both preprocessing conventions and every input size (one batched forward)."""
    runs = [(f"{tag}_{size}", mode, size) for size in manifest["config"]["sizes"]
            for tag, mode in (("pfid", "pytorch_fid"), ("tf1", "adm"))]
    inputs = np.concatenate([np.asarray(preprocess(io[f"images_{size}"], mode))
                             for _, mode, size in runs])
    out = jax.jit(lambda v, x: InceptionV3().apply(v, x, return_stages=True))(variables, inputs)
    out = jax.tree_util.tree_map(np.asarray, out)
    probs = np.asarray(jax.nn.softmax(out["logits_unbiased"]))
    n = len(io[f"images_{runs[0][2]}"])
    for i, (run, _, _) in enumerate(runs):
        rows = slice(i * n, (i + 1) * n)
        assert_close_rel(out["pool3"][rows], io[f"{run}/pool3"], REL, f"{run}/pool3")
        assert_close_rel(out["logits"][rows], io[f"{run}/logits"], REL, f"{run}/logits")
        assert_close_rel(out["logits_unbiased"][rows], io[f"{run}/logits_unbiased"], REL,
                         f"{run}/logits_unbiased")
        assert_close_rel(probs[rows], io[f"{run}/softmax_unbiased"], REL, f"{run}/softmax")
        assert_close_rel(out["spatial"][rows], io[f"{run}/spatial_adm"], REL, f"{run}/spatial")
        for name in STAGES:
            means = out["stages"][name][rows].mean(axis=(1, 2))
            assert_close_rel(means, acts[f"{run}/{name}/chan_mean"], REL, f"{run}/{name}")
    # Not one of the contrast layers of README section 3.
    run = runs[0][0]
    assert np.abs(out["spatial"][:n] - io[f"{run}/alt_spatial_Mixed_6e_branch1x1"]).max() > 1e-2
