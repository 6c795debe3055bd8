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
import pytest
from conftest import xla_flags

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


def assert_same_images(got, want) -> None:
    """uint8 images equal up to float rounding: a program of another batch shape or device
    count may round a pixel's last level the other way on some hosts (1 pixel in 2112 on an
    AVX2 host). Another seed, label or order changes most pixels by far more."""
    got, want = np.asarray(got, np.int16), np.asarray(want, np.int16)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


def make_config(overrides: dict | None = None):
    from udit_jax import config as config_lib
    config = config_lib.base_config()
    config.update_from_flattened_dict({**TINY, **(overrides or {})})
    return config


def random_params(model, std: float = 0.05) -> dict:
    """Random N(0, std^2) params of the model's shapes (nothing zero)."""
    import flax.linen as nn
    import jax
    from udit_jax.models.info import abstract_params
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: (std * rng.standard_normal(a.shape)).astype(np.float32),
                        nn.unbox(abstract_params(model)))


def model_and_params(config):
    """The config's model and random N(0, 0.05^2) params of its shapes."""
    from udit_jax import config as config_lib
    model = config_lib.build_model(config)
    return model, random_params(model)


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
    job_grid = sampler.make_grid(job_images, 2)
    assert_same_images(preview, job_grid)
    np.testing.assert_array_equal(np.asarray(Image.open(job["grid"])), job_grid)

    # In-loop evaluation vs --mode=sample of as many random-class images with its seed.
    evaluation = in_training.InTrainingEvaluation(config, model, mesh)
    in_loop = np.concatenate(list(evaluation.images(params)))
    job = sample.sample_from_config(make_config({
        "sample.export_dir": str(tmp_path / "export"), "sample.num_images": 11,
        "sample.seed": 4}), str(tmp_path))
    with np.load(job["npz"]) as f:
        np.testing.assert_array_equal(f["arr_1"], sampler.random_labels(4, 11, 3))
        assert_same_images(in_loop, f["arr_0"])

    # The guidance and the seed reach the images (a saturated pixel can stay the same).
    for changed, fraction in (({"sample.cfg_scale": 1.0}, 0.1), ({"sample.seed": 8}, 0.5)):
        other = train.make_preview(make_config(changed), model, mesh)(params)
        assert (other != preview).mean() > fraction, changed


@pytest.mark.slow   # the 2-process test below covers it (2 hosts x 4 devices) in CI
def test_in_loop_evaluation_samples_each_image_once_on_8_devices():
    config = make_config()
    from udit_jax import config as config_lib
    from udit_jax.evaluation import in_training
    model, params = model_and_params(config)
    one_device = np.concatenate(list(in_training.InTrainingEvaluation(
        config, model, config_lib.make_mesh(config)).images(params)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
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
    assert_same_images(np.asarray(out["images"], np.uint8), one_device)


def _run_two_processes(score: dict | None) -> list[dict]:
    """The worker in 2 processes x 4 CPU devices joined by jax.distributed on 127.0.0.1;
    each one's JSON report."""
    from test_train import _free_port
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    procs = [subprocess.Popen(
        [sys.executable, __file__, json.dumps({"coordinator": coordinator, "process_id": pid,
                                               "score": score})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [json.loads(log.strip().splitlines()[-1]) for log in logs]


def _check_sharded_once(reports: list[dict], one_device: np.ndarray) -> None:
    """Each batch of 8 was sampled by the 8 devices of the 2 processes, each image once, and
    every process got all of them, equal to the one-device images."""
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["devices"] == 8 and r["program_batch"] == [1] for r in reports)
    for b in range(2):
        devices = [d for r in reports for d in r["devices_per_batch"][b]]
        assert sorted(devices) == list(range(8))
        assert all(len(r["devices_per_batch"][b]) == 4 for r in reports)  # 4 local devices each
    sampled = sorted(i for r in reports for batch in r["images_per_batch"] for i in batch
                     if i is not None)
    assert sampled == list(range(11))
    for r in reports:
        assert_same_images(np.asarray(r["images"], np.uint8), one_device)


def test_in_loop_evaluation_samples_each_image_once_with_2_processes():
    """2 hosts x 4 devices: each device samples its rows; both processes get every image."""
    config = make_config()
    from udit_jax import config as config_lib
    from udit_jax.evaluation import in_training
    model, params = model_and_params(config)
    one_device = np.concatenate(list(in_training.InTrainingEvaluation(
        config, model, config_lib.make_mesh(config)).images(params)))
    _check_sharded_once(_run_two_processes(None), one_device)


@pytest.mark.slow  # Inception features and two 2048-d matrix square roots in each process
def test_in_loop_evaluation_scores_with_2_processes(tmp_path):
    """The full in-loop evaluation (sampling and Inception scoring) in 2 processes: both
    report the one-process scores."""
    from udit_jax.evaluation import in_training
    from udit_jax.evaluation import metrics as M
    from udit_jax import config as config_lib
    weights = pathlib.Path(os.environ.get("UDIT_FIXTURES", REPO.parent / "shared" / "fixtures")
                           ) / "eval" / "inception_fid_weights.npz"
    rng = np.random.default_rng(0)
    pool, spatial = (M.feature_statistics(rng.standard_normal((40, d)).astype(np.float32))
                     for d in (2048, 2023))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    score = {"eval.reference_npz": str(ref), "eval.inception_weights": str(weights),
             "eval.batch_size": 8, "eval.fid_method": "eigh"}
    config = make_config(score)
    model, params = model_and_params(config)
    evaluation = in_training.InTrainingEvaluation(config, model, config_lib.make_mesh(config))
    one_device = np.concatenate(list(evaluation.images(params)))
    expected = evaluation(params, step=3)
    assert set(expected) == {"FID-11", "sFID-11", "IS-11"}
    reports = _run_two_processes(score)
    _check_sharded_once(reports, one_device)
    for r in reports:
        assert r["scores"].keys() == expected.keys()
        np.testing.assert_allclose([r["scores"][k] for k in expected], list(expected.values()),
                                   rtol=1e-4)


def _interval_case(objective: str):
    """(sampler name, process, draws, reference(model_fn, z, y, step_noise) -> x): the
    reference runs the sampler's loop directly; step_noise[s] is the noise of DDPM step index
    s or of SDE step s (sampler.py draws it with salt s + 1)."""
    from udit_jax import diffusion, sampler
    if objective == "ddpm":
        d = diffusion.create_diffusion("4")

        def reference(model_fn, z, y, step_noise):   # p_sample_loop takes them last step first
            return d.p_sample_loop(model_fn, z.shape, noise=z, step_noise=step_noise[::-1],
                                   clip_denoised=True, model_kwargs={"y": y})
        return "ddpm", d, d.num_timesteps, reference
    fn = sampler.transport_process({"path_type": "Linear", "prediction": "velocity"}, "sde", 5,
                                   {"diffusion_form": "sigma"})

    def reference(model_fn, z, y, step_noise):
        return fn.final(z, model_fn, noise=step_noise, y=y)
    return "sde", fn, fn.num_steps - 1, reference


@pytest.mark.parametrize("objective", ["ddpm", "transport"])
def test_guidance_interval_through_the_sampler(objective):
    """Images of sampler.py with a guidance interval against the official forward_with_cfg
    guided by diffusion.guidance.with_guidance_interval in the same loop; (0, 1) is plain
    guidance and an empty interval no guidance."""
    import jax
    import jax.numpy as jnp
    from udit_jax import models, sampler
    from udit_jax.diffusion import guidance
    model = models.build_model("DiT", input_size=8, in_channels=3, num_classes=3, patch_size=4,
                               hidden_size=16, depth=1, num_heads=2, class_dropout_prob=0.1)
    params = random_params(model, 0.3)
    name, process, num_draws, reference = _interval_case(objective)
    labels = np.asarray([2, 0, 1], np.int32)
    key = sampler.noise_key(3)
    keys = [jax.random.fold_in(key, i) for i in range(3)]
    normal = lambda salt: jnp.stack([jax.random.normal(jax.random.fold_in(k, salt), (8, 8, 3))
                                     for k in keys])   # noqa: E731
    z = normal(0)
    # Draw s is the noise of step index s (DDPM) or step number s (SDE), salt s + 1.
    step_noise = jnp.stack([normal(s + 1) for s in range(num_draws)])
    # Noise levels: DDPM's original step / 1000, 1 - SiT's time.
    level = (guidance.ddpm_noise_level(1000) if objective == "ddpm"
             else guidance.transport_noise_level)

    def fwd(x, t, y, scale):
        return model.apply({"params": params}, x, t, y, scale, method="forward_with_cfg")

    def run_reference(guided):
        """guided(x, t, y) on [cond; uncond] halves; the images of the first half."""
        y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
        both = lambda a, axis=0: jnp.concatenate([a, a], axis=axis)   # noqa: E731
        return np.asarray(jax.jit(lambda: reference(guided, both(z), y, both(step_noise, 1)))()[:3])

    def run_sampler(interval, cfg_scale=3.0):
        return sampler.sample_images(model, params, process, labels, key, cfg_scale=cfg_scale,
                                     sampler=name, guidance_interval=interval)

    inside = run_sampler((0.3, 0.8))
    in_interval = guidance.with_guidance_interval(fwd, (0.3, 0.8), level)
    np.testing.assert_allclose(inside, run_reference(lambda x, t, y: in_interval(x, t, y, 3.0)),
                               atol=1e-4)
    full = run_sampler((0.0, 1.0))                 # plain guidance, as the official sampler
    np.testing.assert_allclose(full, run_reference(lambda x, t, y: fwd(x, t, y, 3.0)), atol=1e-4)
    unguided = run_sampler((1.0, 0.0))             # empty: as cfg_scale 1 (no null-class rows)
    np.testing.assert_array_equal(unguided, run_sampler((0.0, 1.0), cfg_scale=1.0))
    # The interval guides some steps, not all: other images than either.
    assert np.abs(inside - full).max() > 1e-2 and np.abs(inside - unguided).max() > 1e-2


def _worker(job: dict | None) -> None:
    """8 devices (in one process, or 4 in each of 2 when `job` names a coordinator): runs the
    in-loop evaluation's sampling and reports which device sampled which image (from the
    shards of each batch the sampler returned), and its scores when job["score"] is set."""
    import jax
    if job:
        jax.distributed.initialize(job["coordinator"], 2, job["process_id"])
    from udit_jax import config as config_lib
    from udit_jax.evaluation import in_training
    config = make_config((job or {}).get("score"))
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
        position = {d: i for i, d in enumerate(jax.devices())}   # ids are not 0..7 with 2 hosts
        report["devices_per_batch"].append([position[shard.device]
                                            for shard in images.addressable_shards])
        # Row r of batch b is image 8b + r when that is one of the 11 (else padding).
        report["images_per_batch"].append(
            [first + r if first + r < 11 else None for s in rows for r in range(*s.indices(8))])
        return images

    evaluation.sampler.fn = recording
    images = np.concatenate(list(evaluation.images(params)))
    if job and job["score"]:
        evaluation.sampler.fn = fn
        report["scores"] = evaluation(params, step=3)
    print(json.dumps({**report, "images": images.tolist(), "devices": jax.device_count(),
                      "process": jax.process_index()}))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]) if len(sys.argv) > 1 else None)


def test_sampling_traces_only_its_platforms_forms():
    """The sampler traces the models' forms for its mesh's platform only (models.forms_for),
    as the train step does: no platform switch is left in its program."""
    import jax
    import jax.numpy as jnp
    from udit_jax import diffusion, models, parallel, sampler
    model = models.build_model("DiT", input_size=8, in_channels=3, num_classes=3, patch_size=4,
                               hidden_size=16, depth=1, num_heads=2)
    params = random_params(model)
    labels = jnp.zeros((2,), jnp.int32)
    for mesh in (None, parallel.make_mesh()):
        fn = sampler.make_batch_sampler(model, diffusion.create_diffusion("3"), cfg_scale=2.0,
                                        mesh=mesh)
        jaxpr = str(fn.trace(params, None, sampler.noise_key(0), jnp.arange(2), labels).jaxpr)
        assert "dot_general" in jaxpr and "platform_index" not in jaxpr
