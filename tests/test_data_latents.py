"""The latent cache: content, bad files, resume, and encoding on 8 devices / 2 processes.

This file is also the entry point of the multi-device and multi-process subprocesses
(`python tests/test_data_latents.py <mode> ...`), so the checks they run live beside the tests.
"""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from udit_jax.data import latents
from udit_jax.data.sources import ClassFolderSource
from conftest import xla_flags

IMAGE_SIZE = 16
SMALL_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)


def _save(path: pathlib.Path, image: Image.Image, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def make_image_folder(root: pathlib.Path, extra_good: int = 0) -> dict:
    """A class-folder dataset with odd sizes, every colour mode and bad files.

    Returns {relative path: label} of the good files and the set of bad relative paths.
    """
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    good, bad = {}, set()
    specs = [  # class, name, image, format
        ("ant", "a.JPEG", rgb(37, 23), "JPEG"),
        ("ant", "gray.png", rgb(41, 30).convert("L"), "PNG"),
        ("ant", "nested/p.png", rgb(19, 33).convert("P"), "PNG"),
        ("bee", "cmyk.jpg", rgb(29, 45).convert("CMYK"), "JPEG"),
        ("bee", "rgba.png", rgb(40, 40).convert("RGBA"), "PNG"),
        ("cow", "big.JPEG", rgb(70, 50), "JPEG"),
    ] + [("cow", f"extra{i}.png", rgb(17 + i, 20), "PNG") for i in range(extra_good)]
    labels = {"ant": 0, "bee": 1, "cow": 2}
    for folder, name, image, fmt in specs:
        _save(root / folder / name, image, fmt)
        good[f"{folder}/{name}"] = labels[folder]
    truncated = _save(root / "bee" / "truncated.JPEG", rgb(40, 40), "JPEG")
    (root / "bee" / "truncated.JPEG").write_bytes(truncated[: len(truncated) // 3])
    (root / "bee" / "zero.JPEG").write_bytes(b"")
    (root / "cow" / "text.JPEG").write_bytes(b"this is not an image\n" * 20)
    _save(root / "cow" / "tiny.png", rgb(4, 4), "PNG")
    _save(root / "ant" / "deep.png", Image.fromarray(np.full((24, 24), 50000, np.uint16)), "PNG")
    (root / "ant" / "README.txt").write_text("ignored: not an image extension")
    bad |= {"bee/truncated.JPEG", "bee/zero.JPEG", "cow/text.JPEG", "cow/tiny.png", "ant/deep.png"}
    return good, bad


def reference_pixels(root: pathlib.Path, rel: str) -> np.ndarray:
    """float32 [S, S, 3] in [-1, 1], computed with Pillow as SPEC section 5 describes it."""
    image = Image.open(root / rel).convert("RGB")
    width, height = image.size
    while min(width, height) >= 2 * IMAGE_SIZE:
        width, height = width // 2, height // 2
        image = image.resize((width, height), Image.Resampling.BOX)
    factor = IMAGE_SIZE / min(width, height)
    width, height = round(width * factor), round(height * factor)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - IMAGE_SIZE) // 2, (height - IMAGE_SIZE) // 2
    pixels = np.asarray(image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)), np.float64)
    return (pixels / 255.0 * 2.0 - 1.0).astype(np.float32)


def standin_encoder(images: np.ndarray):
    """A deterministic, flip-sensitive stand-in for the VAE: 2x2 average pooling plus a 4th channel."""
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
    mean = np.concatenate([pooled, pooled[..., :1] * pooled[..., 1:2]], axis=-1)
    return mean, np.exp(-1.0 - np.abs(mean))


def build(root, cache_dir, encode_fn=standin_encoder, **kw):
    args = dict(image_size=IMAGE_SIZE, vae_identity={"name": "standin"}, records_per_shard=3,
                batch_size=2, max_bad_fraction=0.5, min_image_side=8, decode_threads=2, progress=False)
    args.update(kw)
    return latents.build_latent_cache(ClassFolderSource(root), encode_fn, cache_dir, **args)


def check_cache(root, cache_dir, good, bad, encoder, rtol):
    """Every good image exactly once, right label, both flips = encoder(reference pixels)."""
    cache = latents.LatentCache(cache_dir)
    manifest = cache.manifest
    source = ClassFolderSource(root)
    assert manifest["num_records"] == len(good) == len(cache)
    assert manifest["num_items"] == len(good) + len(bad)
    assert {item["file"] for item in manifest["skipped"]} == bad
    seen = []
    for r in range(len(cache)):
        record = cache[r]
        rel = source.key(record["index"])
        seen.append(rel)
        assert record["label"] == good[rel], rel
        x = reference_pixels(root, rel)
        expected_mean, expected_std = (np.asarray(a, np.float64) for a in encoder(np.stack([x, x[:, ::-1]])))
        for flip in (0, 1):
            scale = max(1.0, np.abs(expected_mean[flip]).max())
            assert np.abs(record["mean"][flip] - expected_mean[flip]).max() <= rtol * scale, (rel, flip)
            assert np.abs(record["std"][flip] - expected_std[flip]).max() <= rtol * max(1.0, expected_std[flip].max())
    assert sorted(seen) == sorted(good), "each good image exactly once"
    return manifest


def test_cache_holds_every_good_image_once_with_both_flips(tmp_path):
    good, bad = make_image_folder(tmp_path / "images")
    manifest = build(tmp_path / "images", tmp_path / "cache")
    # float16 storage: relative error of a half-precision rounding.
    check_cache(tmp_path / "images", tmp_path / "cache", good, bad, standin_encoder, rtol=1e-3)
    assert manifest["dtype"] == "float16" and manifest["latent_shape"] == [IMAGE_SIZE // 2, IMAGE_SIZE // 2, 4]
    assert manifest["num_classes"] == 3 and manifest["class_names"] == ["ant", "bee", "cow"]
    assert manifest["vae"] == {"name": "standin"} and manifest["image_size"] == IMAGE_SIZE
    reasons = {item["file"]: item["reason"] for item in manifest["skipped"]}
    assert "empty" in reasons["bee/zero.JPEG"] and "too small" in reasons["cow/tiny.png"]
    assert "8 bits" in reasons["ant/deep.png"]


def test_float32_cache_is_exact(tmp_path):
    good, bad = make_image_folder(tmp_path / "images")
    build(tmp_path / "images", tmp_path / "cache", dtype="float32")
    check_cache(tmp_path / "images", tmp_path / "cache", good, bad, standin_encoder, rtol=1e-6)


def test_interrupted_encode_resumes_without_duplicates(tmp_path):
    root = tmp_path / "images"
    good, bad = make_image_folder(root, extra_good=6)
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated preemption")
        return standin_encoder(images)

    with pytest.raises(KeyboardInterrupt):
        build(root, tmp_path / "cache", failing)
    done_before = sorted(p.name for p in (tmp_path / "cache").glob("shard-*.json"))
    assert done_before and not (tmp_path / "cache" / "manifest.json").exists()
    assert list((tmp_path / "cache").glob(".*.tmp")), "the interrupted shard was left as a temp file"
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*.array_record")}

    resumed = []
    build(root, tmp_path / "cache", lambda x: resumed.append(1) or standin_encoder(x))
    # Finished shards were not re-encoded or rewritten.
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    full = []
    build(root, tmp_path / "fresh", lambda x: full.append(1) or standin_encoder(x))
    assert 0 < len(resumed) < len(full), "only the unfinished shards were encoded again"
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    check_cache(root, tmp_path / "cache", good, bad, standin_encoder, rtol=1e-3)

    again = []
    build(root, tmp_path / "cache", lambda x: again.append(1) or standin_encoder(x))
    assert again == [], "a re-run of a finished cache does nothing"


def test_other_settings_in_same_cache_dir_are_refused(tmp_path):
    make_image_folder(tmp_path / "images")
    build(tmp_path / "images", tmp_path / "cache")
    with pytest.raises(ValueError, match="other settings.*dtype"):
        build(tmp_path / "images", tmp_path / "cache", dtype="float32")
    # The same data at another path (another host's mount point) is the same cache.
    os.rename(tmp_path / "images", tmp_path / "moved")
    calls = []
    build(tmp_path / "moved", tmp_path / "cache", lambda x: calls.append(1) or standin_encoder(x))
    assert calls == []
    (tmp_path / "moved" / "ant" / "new.png").write_bytes((tmp_path / "moved" / "ant" / "gray.png").read_bytes())
    with pytest.raises(ValueError, match="other settings.*fingerprint"):
        build(tmp_path / "moved", tmp_path / "cache")


def test_too_many_bad_files_fail_clearly_and_keep_shards(tmp_path):
    good, bad = make_image_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="max_bad_fraction"):
        build(tmp_path / "images", tmp_path / "cache", max_bad_fraction=0.1, records_per_shard=100)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert list((tmp_path / "cache").glob("shard-*.array_record"))
    # Allowing more bad files finishes from the kept shards without encoding again.
    spec = json.loads((tmp_path / "cache" / "spec.json").read_text())
    assert spec["records_per_shard"] == 100


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mode=encode"):
        latents.LatentCache(tmp_path)


def test_get_batch_picks_the_flip(tmp_path):
    make_image_folder(tmp_path / "images")
    build(tmp_path / "images", tmp_path / "cache", dtype="float32")
    cache = latents.LatentCache(tmp_path / "cache")
    batch = cache.get_batch(np.array([2, 0, 2]), np.array([True, False, False]))
    np.testing.assert_array_equal(batch["mean"][0], cache[2]["mean"][1])
    np.testing.assert_array_equal(batch["mean"][1], cache[0]["mean"][0])
    np.testing.assert_array_equal(batch["std"][2], cache[2]["std"][0])
    assert batch["label"].dtype == np.int32 and list(batch["label"]) == [cache[2]["label"], cache[0]["label"],
                                                                         cache[2]["label"]]


def test_encode_dataset_from_config(tmp_path):
    import ml_collections
    from udit_jax import config as config_lib

    from udit_jax.convert.io import save_state_dict
    from udit_jax.convert.vae import vae_params_to_torch

    good, bad = make_image_folder(tmp_path / "images")
    vae, params, reference = _small_vae()
    save_state_dict(tmp_path / "vae.safetensors", vae_params_to_torch(vae, params))
    config = config_lib.base_config()
    config.data.update({"source": "folder", "dir": str(tmp_path / "images"),
                        "image_size": IMAGE_SIZE, "cache_dir": "", "cache_dtype": "float32",
                        "max_bad_fraction": 0.5, "min_image_side": 8, "encode_batch_size": 4,
                        "records_per_shard": 5, "num_classes": 3})
    config.vae.weights = str(tmp_path / "vae.safetensors")
    config.vae.arguments = ml_collections.ConfigDict(SMALL_VAE)
    manifest = latents.encode_dataset(config, str(tmp_path / "work"))
    assert manifest["vae"]["params_sha256"] == latents.vae_identity(vae, params)["params_sha256"]
    assert manifest["dtype"] == "float32"
    check_cache(tmp_path / "images", tmp_path / "work" / "latents", good, bad, reference, rtol=1e-4)
    config.data.image_size = IMAGE_SIZE + 1
    with pytest.raises(ValueError, match="multiple of the VAE"):
        latents.encode_dataset(config, str(tmp_path / "work"))


# ------------------------------------------------------------------------------------------
# Real VAE on 8 simulated devices and on 2 processes (subprocesses; see the __main__ block)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    return env


def test_real_vae_encode_on_8_devices(tmp_path):
    make_image_folder(tmp_path / "images")
    result = subprocess.run([sys.executable, __file__, "devices", str(tmp_path)], env=_env(8),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "checked" in result.stdout


def test_real_vae_encode_on_2_processes(tmp_path):
    make_image_folder(tmp_path / "images", extra_good=4)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "processes", str(tmp_path), str(port), str(i)],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:] + err[-5000:]
    assert "checked" in outputs[0][0]
    # Each process wrote a disjoint, non-empty share of the shards, together all of them.
    shards = [json.loads(line.split("shards:", 1)[1]) for out, _ in outputs
              for line in out.splitlines() if line.startswith("shards:")]
    assert len(shards) == 2 and shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert len(shards[0]) + len(shards[1]) == len(list((tmp_path / "cache").glob("shard-*.array_record")))


def test_encode_processes_agree_on_too_many_bad_files(tmp_path):
    """Only process 1's shard holds bad files: both processes stop with the error (no process
    is left waiting at a barrier for one that raised), and spec.json was written once."""
    rng = np.random.default_rng(0)
    for name in ("a/0.png", "a/1.png", "a/2.png", "a/3.png", "b/2.png", "b/3.png"):
        _save(tmp_path / "images" / name, Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)), "PNG")
    for name in ("b/0.png", "b/1.png"):   # sorted first in class b: shard 1 = process 1
        (tmp_path / "images" / name).write_bytes(b"not an image")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "bad_process", str(tmp_path), str(port), str(i)],
                              env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and "refused:" in out, (i, out[-2000:] + err[-3000:])
    assert "2 of 8 images are unreadable" in outputs[1][0]
    assert "process 1 stopped the latent cache job" in outputs[0][0]
    assert not list((tmp_path / "cache").glob(".spec.json.tmp*"))


def _run_bad_process(tmp: pathlib.Path, port: int, process_id: int):
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    try:
        build(tmp / "images", tmp / "cache", records_per_shard=4, max_bad_fraction=0.2)
    except ValueError as e:
        print("refused:", e)


def _small_vae():
    import flax.linen as nn
    import jax
    from udit_jax import models

    vae = models.build_vae(**SMALL_VAE)
    # Random parameters from numpy: compiling vae.init on CPU takes longer than the whole test.
    shapes = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), *vae.example_inputs())["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 1)
                   ).astype(np.float32), shapes)
    encode = jax.jit(lambda x: vae.apply({"params": params}, x, method="encode"))
    reference = lambda x: (lambda m, lv: (np.asarray(m), np.exp(0.5 * np.asarray(lv, np.float64))))(*encode(x))
    return vae, params, reference


def _run_devices(tmp: pathlib.Path):
    import jax

    from udit_jax.data.loader import Loader, sample_latents, to_global_batch
    from udit_jax.parallel import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    vae, params, reference = _small_vae()
    good, bad = make_image_folder(tmp / "probe")  # same generator, same content as tmp/images
    encode_fn = latents.vae_encode_fn(vae, params)
    build(tmp / "images", tmp / "cache", encode_fn, batch_size=3,
          vae_identity=latents.vae_identity(vae, params))
    check_cache(tmp / "images", tmp / "cache", good, bad, reference, rtol=2e-3)
    # The loader's batch becomes a global array on the 8-device mesh; sampling runs on device.
    mesh = make_mesh()
    loader = Loader(latents.LatentCache(tmp / "cache"), global_batch_size=8, seed=0)
    local = next(loader)
    batch = to_global_batch(mesh, local)
    assert batch["mean"].shape == (8, IMAGE_SIZE // 2, IMAGE_SIZE // 2, 4)
    assert len(batch["mean"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
    try:
        to_global_batch(mesh, {"label": local["label"][:4]})
        raise AssertionError("a batch of 4 on 8 devices must be refused")
    except ValueError as e:
        assert "multiple of the device count" in str(e)
    key = jax.random.key(1)
    z = jax.jit(sample_latents, static_argnums=2)(batch, key, 0.5)
    eps = np.asarray(jax.random.normal(key, local["mean"].shape))
    expected = (local["mean"].astype(np.float64) + local["std"].astype(np.float64) * eps) * 0.5
    np.testing.assert_allclose(np.asarray(z), expected, rtol=1e-5, atol=1e-5)
    print("checked")


def _run_processes(tmp: pathlib.Path, port: int, process_id: int):
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.local_device_count() == 2
    vae, params, reference = _small_vae()
    written = []  # the shards this process wrote
    commit = latents._ShardWriter.commit
    latents._ShardWriter.commit = lambda self: written.append(self.name) or commit(self)
    build(tmp / "images", tmp / "cache", latents.vae_encode_fn(vae, params), batch_size=2,
          vae_identity=latents.vae_identity(vae, params))
    print("shards:" + json.dumps(written))
    if process_id == 0:
        good, bad = make_image_folder(tmp / "probe", extra_good=4)
        check_cache(tmp / "images", tmp / "cache", good, bad, reference, rtol=2e-3)
        print("checked")


if __name__ == "__main__":
    mode, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
    if mode == "devices":
        _run_devices(tmp)
    elif mode == "bad_process":
        _run_bad_process(tmp, int(sys.argv[3]), int(sys.argv[4]))
    else:
        _run_processes(tmp, int(sys.argv[3]), int(sys.argv[4]))
