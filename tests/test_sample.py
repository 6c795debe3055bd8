"""Sampling jobs: device-count independence, the official sampler's math, the ADM .npz,
resumption, VAE decoding, bad settings.

A tiny U-DiT (random weights, so the output matters) exported in pixel space; few sampler
steps. The 8-device run is a subprocess (this file run as a script is the worker) in which
the training modules cannot be imported, so it also shows that exports load without them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
UDIT = dict(hidden_size=16, depth=(1, 1, 1, 1, 1), num_heads=2, mlp_ratio=2, down_factor=2,
            ffn_type="rep", rep=1, attn_type="v2", posemb_type="rope2d", downsampler="dwconv5",
            down_shortcut=1, class_dropout_prob=0.1, num_classes=3)
GRID_JOB = dict(classes=[0, 1, 2], per_class=3, seed=7, sampler="ddpm", steps="4", cfg_scale=2.0,
                per_device_batch=2)


def random_params(model, seed: int) -> dict:
    """Params of the model's shapes filled with N(0, 0.05^2) (no init compile; nothing zero)."""
    import flax.linen as nn
    from udit_jax.models.info import abstract_params
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                        nn.unbox(abstract_params(model)))


def write_pixel_export(path, **overrides):
    from udit_jax import export, models
    model = models.build_model("U-DiT", input_size=8, in_channels=3, **{**UDIT, **overrides})
    params = random_params(model, 0)
    export.write_export(path, model, params, diffusion={"noise_schedule": "linear",
                                                        "diffusion_steps": 1000, "learn_sigma": True},
                        data={"space": "pixel", "image_size": 8, "channels": 3, "num_classes": 3,
                              "latent_scale": 0.18215},
                        vae=None, metadata={"source": "test", "step": 1})
    return model, params


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "export"
    model, params = write_pixel_export(path)
    return path, model, params


@pytest.fixture(scope="module")
def grid_job(pixel_export, tmp_path_factory):
    from udit_jax import sample
    out = tmp_path_factory.mktemp("samples") / "grid"
    result = sample.run_sampling_job(pixel_export[0], out, **GRID_JOB)
    assert result["finished"] and result["num_images"] == 9
    return out


def load(npz_path) -> dict:
    with np.load(npz_path) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------

def test_images_identical_on_1_and_8_devices(pixel_export, grid_job, tmp_path):
    out8 = tmp_path / "grid8"
    job = {"export_dir": str(pixel_export[0]), "out_dir": str(out8), **GRID_JOB}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    proc = subprocess.run([sys.executable, __file__, json.dumps(job)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["devices"] == 8
    one, eight = load(grid_job / "samples.npz"), load(out8 / "samples.npz")
    np.testing.assert_array_equal(eight["arr_1"], one["arr_1"])
    np.testing.assert_array_equal(eight["arr_0"], one["arr_0"])
    # Different batching: 5 batches of 2 on one device, one batch of 16 on eight.
    assert len(list((grid_job / "parts").glob("*.npz"))) == 5
    assert len(list((out8 / "parts").glob("*.npz"))) == 1


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_their_own_parts(pixel_export, grid_job, tmp_path):
    """2 hosts x 2 devices: each process writes the images of its devices; process 0 merges."""
    out = tmp_path / "grid2x2"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    procs = [subprocess.Popen(
        [sys.executable, __file__, json.dumps({
            "coordinator": coordinator, "num_processes": 2, "process_id": pid,
            "export_dir": str(pixel_export[0]), "out_dir": str(out), **GRID_JOB})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    # Batches of 4 devices x 2: process 0 holds rows 0-3 of each batch, process 1 rows 4-7.
    parts = {p.name: load(p)["indices"].tolist() for p in (out / "parts").glob("*.npz")}
    assert parts == {"part_000000000.npz": [0, 1, 2, 3], "part_000000004.npz": [4, 5, 6, 7],
                     "part_000000008.npz": [8]}
    np.testing.assert_array_equal(load(out / "samples.npz")["arr_0"],
                                  load(grid_job / "samples.npz")["arr_0"])


def test_job_images_are_the_official_cfg_ddpm_samples(pixel_export, grid_job):
    """The job's images against the official sampling recipe run directly: forward_with_cfg
    on [cond; uncond] halves with the training-form (unfused) model, p_sample_loop, the
    first half kept, with each image's noise drawn as the module docstring says."""
    from udit_jax import diffusion, sampler
    _, model, params = pixel_export
    d = diffusion.create_diffusion(GRID_JOB["steps"])
    labels = np.repeat(GRID_JOB["classes"], GRID_JOB["per_class"]).astype(np.int32)
    n, shape = len(labels), (8, 8, 3)
    keys = [jax.random.fold_in(sampler.noise_key(GRID_JOB["seed"]), i) for i in range(n)]
    x_t = jnp.stack([jax.random.normal(jax.random.fold_in(k, 0), shape) for k in keys])
    # step_noise[j] is used at step t = S-1-j and drawn with salt t + 1.
    steps = d.num_timesteps
    step_noise = jnp.stack([jnp.stack([jax.random.normal(jax.random.fold_in(k, steps - j), shape)
                                       for k in keys]) for j in range(steps)])

    @jax.jit
    def reference(params):
        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y, GRID_JOB["cfg_scale"],
                               method="forward_with_cfg")
        y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
        x = d.p_sample_loop(model_fn, (2 * n,) + shape, noise=jnp.concatenate([x_t, x_t]),
                            step_noise=jnp.concatenate([step_noise, step_noise], axis=1),
                            clip_denoised=True, model_kwargs={"y": y})
        return x[:n]

    expected = np.clip(127.5 * np.asarray(reference(params)) + 128, 0, 255).astype(np.uint8)
    images = load(grid_job / "samples.npz")["arr_0"]
    diff = np.abs(images.astype(int) - expected.astype(int))
    assert expected.std() > 10          # not a degenerate image
    # The job runs the fused FFNs (~1e-6 away): at most a rare rounding step apart.
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_npz_has_the_adm_layout_pngs_and_grid(grid_job):
    from PIL import Image
    from udit_jax.evaluation import reference
    data = load(grid_job / "samples.npz")
    assert sorted(data) == ["arr_0", "arr_1"]
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (9, 8, 8, 3)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert reference.image_array_info(grid_job / "samples.npz").shape == (9, 8, 8, 3)
    for i in (0, 4, 8):
        png = np.asarray(Image.open(grid_job / "images" / f"{i:06d}.png"))
        np.testing.assert_array_equal(png, images[i])
    grid = np.asarray(Image.open(grid_job / "grid.png"))
    assert grid.shape == (3 * 8, 3 * 8, 3)
    for i in range(9):   # row = class, column = sample of that class
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[8 * r:8 * r + 8, 8 * c:8 * c + 8], images[i])


def test_interrupted_job_resumes_without_duplicates_or_losses(pixel_export, tmp_path):
    from udit_jax import config as config_lib
    from udit_jax import sample, sampler
    export_dir = pixel_export[0]
    job = dict(num_images=5, seed=3, sampler="ddim", steps="ddim3", cfg_scale=1.0,
               per_device_batch=2)
    out = tmp_path / "job"
    first = sample.run_sampling_job(export_dir, out, **job, max_batches=1)
    assert not first["finished"] and first["npz"] is None
    parts = sorted((out / "parts").glob("*.npz"))
    assert [p.name for p in parts] == ["part_000000000.npz"]
    kept = parts[0].read_bytes()
    # A crash while the next part was being written leaves a partial temporary file.
    (out / "parts" / ".part_000000002.npz.tmp0").write_bytes(kept[:100])

    config = config_lib.base_config()
    config.sample.update(dict(classes=[0], per_class=1, export_dir=str(export_dir),
                              out_dir=str(out), **job))
    second = sample.sample_from_config(config, str(tmp_path))
    assert second["finished"]
    assert (out / "parts" / "part_000000000.npz").read_bytes() == kept   # finished part kept
    indices = np.concatenate([load(p)["indices"] for p in (out / "parts").glob("part_*.npz")])
    assert sorted(indices.tolist()) == [0, 1, 2, 3, 4]                   # each image once
    resumed = load(out / "samples.npz")
    np.testing.assert_array_equal(resumed["arr_1"], sampler.random_labels(3, 5, 3))
    assert set(resumed["arr_1"].tolist()) <= {0, 1, 2}

    # Uninterrupted, in batches of 3: every image sits elsewhere in its batch.
    whole = sample.run_sampling_job(export_dir, tmp_path / "whole", **dict(job, per_device_batch=3))
    np.testing.assert_array_equal(resumed["arr_0"], load(whole["npz"])["arr_0"])

    # Running a finished job again samples nothing and rewrites the same files.
    again = sample.run_sampling_job(export_dir, out, **job)
    assert again["finished"] and len(list((out / "parts").glob("part_*.npz"))) == 3
    np.testing.assert_array_equal(load(again["npz"])["arr_0"], resumed["arr_0"])

    with pytest.raises(ValueError, match="holds samples of another job.*seed"):
        sample.run_sampling_job(export_dir, out, **dict(job, seed=4))


def test_folder_no_job_wrote_is_refused_and_kept(pixel_export, tmp_path):
    """A samples.npz in a folder without job.json (another tool's, a copied result) is never
    replaced: the job refuses the folder before sampling."""
    from udit_jax import sample
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "samples.npz").write_bytes(b"someone else's samples")
    with pytest.raises(ValueError, match=r"sample.out_dir: .*results is a non-empty directory"):
        sample.run_sampling_job(pixel_export[0], folder, num_images=2, seed=0, sampler="ddim",
                                steps="ddim2", cfg_scale=1.0, per_device_batch=2)
    assert (folder / "samples.npz").read_bytes() == b"someone else's samples"
    assert sorted(p.name for p in folder.iterdir()) == ["samples.npz"]


def test_grids_of_another_size_get_their_own_folder(pixel_export, tmp_path):
    """The README's grid, then the issue's 100-per-class protocol with default out_dirs: the
    second job must not be refused as "another job" in the first one's folder."""
    from udit_jax import config as config_lib
    from udit_jax import sample
    config = config_lib.base_config()
    config.sample.update(dict(classes=[0, 2], per_class=1, export_dir=str(pixel_export[0]),
                              seed=1, sampler="ddim", steps="ddim2", per_device_batch=2,
                              write_png=False))
    small = sample.sample_from_config(config, str(tmp_path))
    config.sample.per_class = 2
    large = sample.sample_from_config(config, str(tmp_path))
    assert small["finished"] and large["finished"]
    assert pathlib.Path(small["out_dir"]).name.endswith("-grid2x1")
    assert pathlib.Path(large["out_dir"]).name.endswith("-grid2x2")
    assert load(large["npz"])["arr_1"].tolist() == [0, 0, 2, 2]


def test_latent_model_is_decoded_with_the_vae(tmp_path):
    from udit_jax import convert, diffusion, export, models, sample, sampler
    from udit_jax.convert.vae import vae_params_to_torch
    from udit_jax.models.vae import decode_latents
    vae_args = dict(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4,
                    sample_size=16)
    vae = models.build_vae(**vae_args)
    vae_params = random_params(vae, 1)
    weights = tmp_path / "vae.safetensors"
    convert.save_state_dict(weights, vae_params_to_torch(vae, vae_params))
    model = models.build_model("U-DiT", input_size=8, in_channels=4, **UDIT)
    params = random_params(model, 2)
    export.write_export(tmp_path / "export", model, params,
                        diffusion={"noise_schedule": "linear", "diffusion_steps": 1000,
                                   "learn_sigma": True},
                        data={"space": "latent", "image_size": 16, "channels": 3, "num_classes": 3,
                              "latent_scale": 0.18215},
                        vae={"arguments": vae_args, "weights": str(weights)}, metadata={})
    job = dict(classes=[1], per_class=2, seed=0, sampler="dpm", steps="3", per_device_batch=2)
    result = sample.run_sampling_job(tmp_path / "export", tmp_path / "out", **job, write_png=False)
    images = load(result["npz"])["arr_0"]
    assert images.shape == (2, 16, 16, 3)

    latents = sampler.sample_images(model, params, diffusion.create_diffusion("3"), [1, 1],
                                    sampler.noise_key(0), sampler="dpm", batch_size=2,
                                    clip_denoised=False)   # latents are never clipped
    assert latents.shape == (2, 8, 8, 4)
    expected = sampler.quantize(jax.jit(lambda p, z: decode_latents(vae, p, z))(vae_params, latents))
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1

    export.write_export(tmp_path / "e2", model, params, diffusion={"noise_schedule": "linear",
                        "diffusion_steps": 1000, "learn_sigma": True},
                        data={"space": "latent", "image_size": 16, "channels": 3,
                              "num_classes": 3, "latent_scale": 0.18215},
                        vae={"arguments": vae_args, "weights": ""}, metadata={})
    with pytest.raises(ValueError, match="config.vae.weights"):
        sample.run_sampling_job(tmp_path / "e2", tmp_path / "out2", **job)
    with pytest.raises(FileNotFoundError, match="VAE weights not found"):
        sample.run_sampling_job(tmp_path / "e2", tmp_path / "out2", **job,
                                vae_weights=str(tmp_path / "missing.safetensors"))


def test_bad_settings_fail_before_sampling(pixel_export, tmp_path):
    from udit_jax import sample
    export_dir = pixel_export[0]
    with pytest.raises(ValueError, match="sampler='euler'"):
        sample.run_sampling_job(export_dir, tmp_path / "a", num_images=2, sampler="euler")
    with pytest.raises(ValueError, match=r"labels \[5\] are outside \[0, 3\)"):
        sample.run_sampling_job(export_dir, tmp_path / "b", classes=[1, 5])
    with pytest.raises(ValueError, match="either classes"):
        sample.run_sampling_job(export_dir, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        sample.run_sampling_job(tmp_path, tmp_path / "d", num_images=2)
    no_null = tmp_path / "no_null"
    write_pixel_export(no_null, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        sample.run_sampling_job(no_null, tmp_path / "e", num_images=2, cfg_scale=4.0)


# ----------------------------------------------------------------------------------------
# Worker: `python tests/test_sample.py '<json job>'` (the 8-device run).

if __name__ == "__main__":
    for blocked in ("udit_jax.train", "udit_jax.checkpoints"):
        sys.modules[blocked] = None   # importing them now raises ImportError
    _job = json.loads(sys.argv[1])
    if "coordinator" in _job:
        jax.distributed.initialize(_job.pop("coordinator"), _job.pop("num_processes"),
                                   _job.pop("process_id"))
    from udit_jax import sample as _sample
    _result = _sample.run_sampling_job(_job.pop("export_dir"), _job.pop("out_dir"), **_job)
    print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), **_result}))
