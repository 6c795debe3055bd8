"""Exports: EMA params of training checkpoints, official checkpoints imported, PyTorch weights.

A tiny pixel-space U-DiT; its training checkpoints are written with the training code's
own Checkpointer (EMA params deliberately different from the trained params, so exporting
the wrong tree fails). Official names and layouts are checked against the parity fixture
of the reduced official U-DiT.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import FIXTURES, load_npz
from udit_jax import convert, export
from udit_jax import config as config_lib

TINY = {"model.name": "U-DiT",
        "model.kwargs": dict(hidden_size=16, depth=(1, 2, 1, 2, 1), num_heads=2, mlp_ratio=2,
                             down_factor=2, ffn_type="rep", rep=1, attn_type="v2",
                             posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1),
        "data.source": "synthetic", "data.space": "pixel", "data.image_size": 8,
        "data.channels": 1, "data.num_classes": 3, "batch_size": 4}
STEPS = (3, 6)


def make_config(overrides: dict | None = None):
    from udit_jax import train
    config = config_lib.base_config()
    config.update_from_flattened_dict({**TINY, **(overrides or {})})
    return config


def flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_trees_identical(actual, expected, what: str) -> None:
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), what
    for k in e:
        assert a[k].dtype == e[k].dtype, f"{what}: {k}"
        np.testing.assert_array_equal(a[k], e[k], err_msg=f"{what}: {k}")


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def trained(tmp_path_factory, request):
    """(config, workdir, {step: EMA params}) of a run with checkpoints at STEPS, with the
    blocks unrolled or each stage's blocks scanned (model.scan_blocks, the ImageNet configs').

    The train state is filled with random values (no compilation); the EMA params differ
    from the trained params and between steps.
    """
    from udit_jax import checkpoints, parallel, train
    workdir = tmp_path_factory.mktemp("run")
    config = make_config({"model.scan_blocks": request.param})
    model = config_lib.build_model(config)
    tx, _ = config_lib.make_optimizer(config.optimizer)
    abstract, _ = train.state_shardings(model, tx, config.seed, parallel.make_mesh(),
                                        config.mesh.rules)
    rng = np.random.default_rng(0)

    def fill(a):
        if np.issubdtype(a.dtype, np.floating):
            return (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
        return np.zeros(a.shape, a.dtype)

    state = jax.tree.map(fill, abstract)
    ckpt = checkpoints.Checkpointer(workdir, keep=5, keep_every=None, async_save=False)
    emas = {}
    for step in STEPS:
        emas[step] = jax.tree.map(fill, abstract.ema_params)
        ckpt.save(step, state.replace(step=np.int32(step), ema_params=emas[step]),
                  train.SyntheticBatches(config, 0, 1))
    ckpt.close()
    return config, workdir, emas


def test_export_reads_a_run_written_with_the_other_block_layout(trained, tmp_path):
    """A run trained scanned exports with an unrolled config, and the other way round: the
    EMA params re-laid, the export built as the config says."""
    from udit_jax.models.udit import relayout_blocks
    config, workdir, emas = trained
    other = make_config({"model.scan_blocks": not config.model.scan_blocks,
                         "export.dir": str(tmp_path / "other")})
    model, params, _ = export.load_export(export.export_from_config(other, str(workdir)))
    assert model.scan_blocks == other.model.scan_blocks
    expected = relayout_blocks(emas[STEPS[-1]], model.depth, scanned=other.model.scan_blocks)
    assert_trees_identical(params, expected, "EMA in the other layout")


def test_export_writes_ema_params_of_latest_or_given_step(trained, tmp_path):
    config, workdir, emas = trained
    out = export.export_from_config(config, str(workdir))
    assert out == str(workdir / "export")
    model, params, info = export.load_export(out)
    assert_trees_identical(params, emas[STEPS[-1]], "latest EMA")
    meta = info["metadata"]
    assert meta["step"] == STEPS[-1] and meta["source"] == "training"
    assert meta["dataset"] == "synthetic"
    assert meta["config_hash"] == export.config_hash(config)
    assert info["data"] == {"space": "pixel", "image_size": 8, "channels": 1, "num_classes": 3,
                            "latent_scale": config.data.latent_scale}
    assert info["diffusion"] == {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
    assert info["vae"] is None
    assert (model.hidden_size, tuple(model.depth), model.in_channels) == (16, (1, 2, 1, 2, 1), 1)
    assert model.scan_blocks == config.model.scan_blocks   # sampling jobs build what trained
    # Nothing but the model's params is stored (no optimizer moments, no step counter).
    stored = set((workdir / "export" / "params").glob("**/*"))
    assert not [p for p in stored if "opt" in p.name or "mu" == p.name]
    assert json.loads((workdir / "export" / "config.json").read_text())["model"]["name"] == "U-DiT"

    config.export.step, config.export.dir = STEPS[0], str(tmp_path / "older")
    _, older, info = export.load_export(export.export_from_config(config, str(workdir)))
    assert_trees_identical(older, emas[STEPS[0]], "EMA of the given step")
    assert info["metadata"]["step"] == STEPS[0]

    config.export.step = 5
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 .*\[3, 6\]"):
        export.export_from_config(config, str(workdir))
    # An existing directory that is not an export (here: the training run) is never replaced,
    # and is refused before the checkpoint is read.
    config.export.step, config.export.dir = 0, str(workdir)
    with pytest.raises(ValueError, match=r"^export.dir: .* is a non-empty directory of something else"):
        export.export_from_config(config, str(workdir))
    assert (workdir / "checkpoints" / str(STEPS[-1])).exists()


def test_config_hash_ignores_post_training_sections():
    a, b = make_config(), make_config({"sample.cfg_scale": 1.5, "export.step": 7})
    assert export.config_hash(a) == export.config_hash(b)
    assert export.config_hash(a) != export.config_hash(make_config({"optimizer.learning_rate": 3e-4}))


def test_missing_checkpoints_and_exports_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoints"):
        export.export_from_config(make_config(), str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="training workdir: run --mode=export"):
        export.load_export(tmp_path)


def test_torch_weights_convert_back_bit_identical(trained, tmp_path):
    config, workdir, emas = trained
    config.export.step, config.export.dir, config.export.torch_weights = 0, str(tmp_path / "e"), True
    model, params, _ = export.load_export(export.export_from_config(config, str(workdir)))
    state_dict = convert.load_state_dict(tmp_path / "e" / export.TORCH_WEIGHTS_FILE)
    # Official names and PyTorch layouts (Conv2d weight (out, in, kh, kw), Linear (out, in)).
    kernel = np.asarray(params["x_embedder"]["kernel"])          # HWIO (3, 3, 1, 16)
    np.testing.assert_array_equal(state_dict["x_embedder.proj.weight"], kernel.transpose(3, 2, 0, 1))
    assert state_dict["encoder_level_1.0.mlp1.dwconv.0.weight"].shape == (32, 1, 5, 5)
    assert state_dict["encoder_level_2.1.mlp1.dwconv.0.weight"].shape == (64, 1, 5, 5)
    assert state_dict["latent.0.attn2.to_qkv.weight"].shape == (3 * 64, 64)
    assert state_dict["y_embedder_3.embedding_table.weight"].shape == (4, 64)
    assert_trees_identical(convert.params_from_torch(model, state_dict), emas[STEPS[-1]],
                           "params from the exported PyTorch state_dict")


# ----------------------------------------------------------------------------------------
# Import of official checkpoints.

def _reduced_udit():
    """(import_official arguments for the fixture's official reduced U-DiT, its state_dict)."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    config = dict(manifest["udit_reduced"]["config"])
    size, channels = config.pop("input_size"), config.pop("in_channels")
    # 4 channels: SD-VAE latents of images 8x larger; otherwise a pixel-space model.
    space = dict(space="latent", image_size=8 * size) if channels == 4 else \
        dict(space="pixel", image_size=size, channels=channels)
    return dict(space, num_classes=config.pop("num_classes"), **config), \
        load_npz("udit_reduced_state_dict.npz")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_import_official_state_dict_round_trips(suffix, tmp_path, fixtures_dir):
    arguments, state_dict = _reduced_udit()
    path = tmp_path / f"U-DiT-reduced{suffix}"
    convert.save_state_dict(path, state_dict)
    out = export.import_official(path, "U-DiT", tmp_path / "export", torch_weights=True, **arguments)
    model, params, info = export.load_export(out)
    assert info["metadata"]["source"] == "import"
    assert info["metadata"]["weights_file"] == path.name
    assert info["data"]["space"] == arguments["space"]
    assert info["vae"] == ({"arguments": {}, "weights": ""} if arguments["space"] == "latent" else None)
    back = convert.load_state_dict(out / export.TORCH_WEIGHTS_FILE)
    assert back.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    np.testing.assert_array_equal(np.asarray(params["latent_0"]["attn1"]["to_qkv"]["kernel"]),
                                  state_dict["latent.0.attn1.to_qkv.weight"].T)


def test_import_command_line(tmp_path, fixtures_dir):
    arguments, state_dict = _reduced_udit()
    path = tmp_path / "weights.npz"
    convert.save_state_dict(path, state_dict)
    flags = [f"--{k}={arguments.pop(k)}" for k in ("space", "image_size", "num_classes", "channels")
             if k in arguments]
    assert export.main([f"--import_weights={path}", "--model=U-DiT", f"--out={tmp_path / 'out'}",
                        *flags, f"--model_kwargs={json.dumps(arguments)}"]) == 0
    model, params, _ = export.load_export(tmp_path / "out")
    assert model.hidden_size == arguments["hidden_size"] and tuple(model.depth) == tuple(arguments["depth"])
    with pytest.raises(SystemExit):
        export.main([f"--import_weights={path}", f"--out={tmp_path / 'x'}", "--model_kwargs={bad"])


def test_official_file_names_name_the_model():
    assert export.guess_model("ckpts/DiT-XL-2-256x256.pt") == ("DiT-XL/2", 256, None)
    assert export.guess_model("DiT-XL-2-512x512.pt") == ("DiT-XL/2", 512, None)
    assert export.guess_model("/x/U-DiT-L-1000k.pt") == ("U-DiT-L", 256, 1_000_000)
    assert export.guess_model("U-DiT-S-400k.safetensors") == ("U-DiT-S", 256, 400_000)
    assert export.guess_model("model.pt") is None
    with pytest.raises(ValueError, match="--model="):
        export.import_official("model.npz", None, "out")


def test_udit_s_weights_imported_as_dit_xl_are_refused_with_keys(tmp_path, fixtures_dir):
    official = json.loads((FIXTURES / "udit_full_configs.json").read_text())["U-DiT-S"]
    # Zero-stride stand-ins of the official U-DiT-S tensors: the check allocates nothing.
    state_dict = {k: np.broadcast_to(np.float32(0), tuple(s))
                  for k, s in official["state_dict_shapes"].items()}
    with pytest.raises(convert.ConversionError) as error:
        export.import_state_dict(state_dict, "DiT-XL/2", tmp_path / "out")
    message = str(error.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "blocks.0.attn.qkv.weight" in message           # what DiT-XL/2 needs
    assert "decoder_level_1.0.adaLN_modulation1.1.bias" in message   # what U-DiT-S has
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------
# .pt files: a pickle must never run code.

class _RunsCode:
    """Unpickling this object calls exec(): what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_pickle(marker) -> bytes:
    return pickle.dumps({"ema": {"x_embedder.proj.weight": _RunsCode(marker)}}, protocol=2)


def _torch_zip_checkpoint(path, payload: bytes) -> None:
    """The zip layout torch.save writes: <name>/data.pkl, <name>/version, <name>/byteorder."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pt_with_code_in_its_pickle_is_refused_and_never_runs(layout, tmp_path):
    marker = tmp_path / "marker"
    payload = _malicious_pickle(marker)
    # The payload is live: a plain unpickler runs it.
    pickle.load(io.BytesIO(payload))
    assert marker.read_text() == "pwned"
    marker.unlink()

    path = tmp_path / "U-DiT-S-400k.pt"
    if layout == "zip":
        _torch_zip_checkpoint(path, payload)
    else:
        path.write_bytes(payload)
    if importlib.util.find_spec("torch") is None:
        expected = (ImportError, r"needs PyTorch: pip install 'udit-jax\[torch\]'")
    else:
        expected = (ValueError, "refused to load")
    with pytest.raises(expected[0], match=expected[1]):
        export.import_official(path, None, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_official_train_checkpoint_with_its_args_is_read(tmp_path):
    """The official train.py saves {"model", "ema", "opt", "args": argparse.Namespace}: the
    Namespace is plain data and is allowed; the EMA weights are taken."""
    import argparse
    torch = pytest.importorskip("torch")
    from udit_jax import convert
    ema, raw = {"w": torch.ones(2, 3)}, {"w": torch.zeros(2, 3)}
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="U-DiT-B", global_batch_size=256)}, path)
    state_dict = convert.load_state_dict(path)
    np.testing.assert_array_equal(state_dict["w"], np.ones((2, 3), np.float32))
