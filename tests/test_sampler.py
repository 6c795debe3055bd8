"""The one sampler: training previews, in-loop evaluation and `--mode=sample` give the same
images for the same params, seed and labels; in-loop evaluation is sharded over the mesh
(each device samples its share, each image once).

A tiny pixel-space U-DiT with the re-parameterisable FFN (so the FFN fusion is on the path)
and random weights (so the images carry information), guided (cfg_scale 2), DDPM (so the
per-step noise matters), 3 steps. The 8-device run is a subprocess (this file run as a
script is the worker).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "model.name": "U-DiT",
    "model.kwargs": dict(hidden_size=16, depth=(1, 1, 1, 1, 1), num_heads=2, mlp_ratio=2,
                         down_factor=2, ffn_type="rep", rep=1, attn_type="v2",
                         posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1,
                         class_dropout_prob=0.1),
    "data.space": "pixel", "data.image_size": 8, "data.channels": 3, "data.num_classes": 3,
    "sample.classes": [2, 0, 1], "sample.per_class": 2, "sample.sampler": "ddpm",
    "sample.steps": "3", "sample.cfg_scale": 2.0, "sample.seed": 7, "sample.per_device_batch": 2,
    "sample.write_png": False,
    # In-loop evaluation: 11 images of random classes in batches of 8 (the last one padded).
    # Its scorer is built on first use only; these paths are never read here.
    # Its sampling settings are the preview's, so its images are a sampling job's.
    "eval.in_loop_num_samples": 11, "eval.sample_batch": 8, "eval.seed": 4,
    "eval.is_split_size": 11, "eval.sampler": "ddpm", "eval.steps": "3", "eval.cfg_scale": 2.0,
    "eval.reference_npz": "unused.npz", "eval.inception_weights": "unused.pth",
}


def make_config(overrides: dict | None = None):
    from udit_jax import config as config_lib
    config = config_lib.base_config()
    config.update_from_flattened_dict({**TINY, **(overrides or {})})
    return config


def model_and_params(config):
    """The config's model and random N(0, 0.05^2) params of its shapes (nothing zero)."""
    import flax.linen as nn
    import jax
    from udit_jax import config as config_lib
    from udit_jax.models.info import abstract_params
    model = config_lib.build_model(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                          nn.unbox(abstract_params(model)))
    return model, params


def write_export(config, model, params, path) -> None:
    from udit_jax import config as config_lib
    from udit_jax import export
    export.write_export(path, model, params, diffusion=config_lib.diffusion_arguments(config),
                        data={"space": "pixel", "image_size": 8, "channels": 3, "num_classes": 3,
                              "latent_scale": config.data.latent_scale},
                        vae=None, metadata={"source": "test", "step": 1})


def test_preview_in_loop_evaluation_and_sampling_job_draw_the_same_images(tmp_path):
    from PIL import Image
    from udit_jax import config as config_lib
    from udit_jax import sample, sampler, train
    from udit_jax.evaluation import in_training
    config = make_config({"sample.export_dir": str(tmp_path / "export")})
    model, params = model_and_params(config)
    write_export(config, model, params, tmp_path / "export")
    mesh = config_lib.make_mesh(config)

    # The class grid: the training preview vs --mode=sample (batches of 2 instead of 6).
    preview = train.make_preview(config, model, mesh)(params)
    job = sample.sample_from_config(config, str(tmp_path))
    with np.load(job["npz"]) as f:
        job_images, job_labels = f["arr_0"], f["arr_1"]
    np.testing.assert_array_equal(job_labels, [2, 2, 0, 0, 1, 1])
    assert job_images.std() > 10                     # not a degenerate image
    np.testing.assert_array_equal(preview, sampler.make_grid(job_images, 2))
    np.testing.assert_array_equal(preview, np.asarray(Image.open(job["grid"])))

    # In-loop evaluation vs --mode=sample of as many random-class images with its seed.
    evaluation = in_training.InTrainingEvaluation(config, model, mesh)
    in_loop = np.concatenate(list(evaluation.images(params)))
    job = sample.sample_from_config(make_config({
        "sample.export_dir": str(tmp_path / "export"), "sample.num_images": 11,
        "sample.seed": 4}), str(tmp_path))
    with np.load(job["npz"]) as f:
        np.testing.assert_array_equal(f["arr_1"], sampler.random_labels(4, 11, 3))
        np.testing.assert_array_equal(in_loop, f["arr_0"])

    # The guidance and the seed reach the images (a saturated pixel can stay the same).
    for changed, fraction in (({"sample.cfg_scale": 1.0}, 0.1), ({"sample.seed": 8}, 0.5)):
        other = train.make_preview(make_config(changed), model, mesh)(params)
        assert (other != preview).mean() > fraction, changed


def test_in_loop_evaluation_samples_each_image_once_on_8_devices():
    config = make_config()
    from udit_jax import config as config_lib
    from udit_jax.evaluation import in_training
    model, params = model_and_params(config)
    one_device = np.concatenate(list(in_training.InTrainingEvaluation(
        config, model, config_lib.make_mesh(config)).images(params)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Two batches of 8; in each, every device computed one row.
    assert [sorted(b) for b in out["devices_per_batch"]] == [list(range(8))] * 2
    assert out["program_batch"] == [1]
    sampled = sorted(i for b in out["images_per_batch"] for i in b if i is not None)
    assert sampled == list(range(11))                # each image once, none missing
    np.testing.assert_array_equal(np.asarray(out["images"], np.uint8), one_device)


def _worker() -> None:
    """8 devices: runs the in-loop evaluation's sampling and reports which device sampled
    which image (from the shards of each batch the sampler returned)."""
    import jax
    from udit_jax import config as config_lib
    from udit_jax.evaluation import in_training
    config = make_config()
    model, params = model_and_params(config)
    evaluation = in_training.InTrainingEvaluation(config, model, config_lib.make_mesh(config))
    fn, report = evaluation.sampler.fn, {"devices_per_batch": [], "images_per_batch": []}

    def recording(params, vae_params, key, indices, labels):
        if not report["devices_per_batch"]:
            # The compiled program works on each device's rows only: x_T is [1, 8, 8, 3] per
            # device, never the batch of 8.
            hlo = fn.lower(params, vae_params, key, indices, labels).compile().as_text()
            report["program_batch"] = [n for n in (1, 8) if f"f32[{n},8,8,3]" in hlo]
        images = fn(params, vae_params, key, indices, labels)
        first = len(report["images_per_batch"]) * 8
        rows = [shard.index[0] for shard in images.addressable_shards]
        report["devices_per_batch"].append([shard.device.id for shard in images.addressable_shards])
        # Row r of batch b is image 8b + r when that is one of the 11 (else padding).
        report["images_per_batch"].append(
            [first + r if first + r < 11 else None for s in rows for r in range(*s.indices(8))])
        return images

    evaluation.sampler.fn = recording
    images = np.concatenate(list(evaluation.images(params)))
    print(json.dumps({**report, "images": images.tolist(), "devices": jax.device_count()}))


if __name__ == "__main__":
    _worker()
