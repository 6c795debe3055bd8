"""Bad input never becomes a wrong number or a traceback (issue 14).

Each test is named after the problem it guards: labels and latent caches checked against the
config before compiling; bad values refused before compiling; --mode=evaluate's defaults are the
papers' protocol; a sampling job with another VAE or dtype never reuses images; in-loop
evaluation checked at start; file errors naming the file; transient read errors retried; the
export -> official weights -> import round trip as one command; and `main` turning every
expected error into one line on stderr (a table of bad inputs run through the real entry point).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from udit_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config(**overrides):
    """The demo config (tiny U-DiT, pixel space) with dotted overrides."""
    sys.path.insert(0, str(REPO))
    from configs import demo
    config = demo.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def class_folders(root: pathlib.Path, classes: int, per_class: int = 2, size: int = 16) -> str:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            path = root / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(path)
    return str(root)


# ----------------------------------------------------------------------------------------
# 1. Labels and latent caches against the config.

def test_source_with_more_classes_than_config_fails_before_compiling(tmp_path):
    """Three class folders with data.num_classes=2: label 2 would be the null class."""
    from udit_jax import data
    config = demo_config(**{"data.source": "folder", "data.num_classes": 2,
                            "data.dir": class_folders(tmp_path / "images", 3)})
    with pytest.raises(ValueError, match=r"data.num_classes=2 but the data source has 3 classes"):
        data.make_loader(config, global_batch_size=2, seed=0, workdir=str(tmp_path))
    with pytest.raises(ValueError, match=r"labels \[2\] are outside \[0, 2\)"):
        data.ImageTable(np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 1, 2]), num_classes=2)


def _tiny_vae_weights(path: pathlib.Path, seed: int):
    """A 4-level AutoencoderKL (downsampling 8, as the SD VAE) with random weights saved as
    safetensors; returns (vae arguments, vae, params)."""
    import flax.linen as nn
    import jax
    from udit_jax import convert, models
    from udit_jax.convert.vae import vae_params_to_torch
    arguments = dict(block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
                     sample_size=16)
    vae = models.build_vae(**arguments)
    shapes = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), *vae.example_inputs())["params"])
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    convert.save_state_dict(path, vae_params_to_torch(vae, params))
    return arguments, vae, params


def test_latent_cache_built_for_other_settings_is_refused(tmp_path):
    """Image size, class count, latent scale and the VAE itself are compared with the config."""
    from udit_jax import data
    from udit_jax.data import latents
    from udit_jax.data.sources import ClassFolderSource
    arguments, vae, params = _tiny_vae_weights(tmp_path / "vae_a.safetensors", seed=1)
    _tiny_vae_weights(tmp_path / "vae_b.safetensors", seed=2)

    def encode(images):   # [B, 16, 16, 3] -> [B, 2, 2, 4], a stand-in for the VAE's encoder
        pooled = images.reshape(len(images), 2, 8, 2, 8, 3).mean(axis=(2, 4))
        mean = np.concatenate([pooled, pooled[..., :1]], axis=-1)
        return mean, np.ones_like(mean)

    cache_dir = tmp_path / "cache"
    latents.build_latent_cache(ClassFolderSource(class_folders(tmp_path / "images", 2)), encode,
                               cache_dir, image_size=16, records_per_shard=8, batch_size=2,
                               vae_identity=latents.vae_identity(vae, params, "vae_a.safetensors"),
                               min_image_side=8, progress=False)

    def loader(**overrides):
        config = config_lib.base_config()
        config.update_from_flattened_dict({
            "data.space": "latent", "data.image_size": 16, "data.num_classes": 2,
            "data.cache_dir": str(cache_dir), "vae.weights": str(tmp_path / "vae_a.safetensors"),
            **overrides})
        config.vae.arguments = arguments
        return data.make_loader(config, global_batch_size=2, seed=0, workdir=str(tmp_path))

    assert next(loader())["mean"].shape == (2, 2, 2, 4)   # the matching config reads it
    for overrides, what in [({"data.num_classes": 3}, "num_classes: cache 2, config 3"),
                            ({"data.image_size": 24}, "image_size: cache 16, config 24"),
                            ({"data.latent_scale": 0.5}, "latent_scale"),
                            ({"vae.weights": str(tmp_path / "vae_b.safetensors")},
                             "vae.params_sha256")]:
        with pytest.raises(ValueError, match=f"built for other settings.*{what}"):
            loader(**overrides)


# ----------------------------------------------------------------------------------------
# 2. --mode=evaluate's defaults; a sampling job's identity.

def test_evaluate_defaults_to_the_papers_protocol(tmp_path, monkeypatch):
    """50,000 samples, DDPM-250, float32, the guidance of the config's paper table (U-DiT's
    and DiT's 400K tables: none), whatever the preview sampler and training dtype are."""
    from udit_jax import sample
    from udit_jax.evaluation import evaluate
    for name in ("udit_b", "dit_xl_2"):
        sys.path.insert(0, str(REPO))
        config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
        assert config.model.dtype == "bfloat16" and config.sample.cfg_scale == 4.0
        settings = config_lib.sampling(config, "eval")
        assert (config.eval.num_samples, settings["sampler"], settings["steps"],
                settings["cfg_scale"], settings["dtype"],
                settings["guide_all_channels"]) == (50_000, "ddpm", "250", 1.0, "float32", False)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048))
    (tmp_path / "inception.pth").write_bytes(b"x")
    config.eval.update(reference_npz=str(tmp_path / "ref.npz"),
                       inception_weights=str(tmp_path / "inception.pth"))
    config.sample.sampler = "dpm"
    jobs, scored = [], []
    monkeypatch.setattr(sample, "run_sampling_job",
                        lambda *a, **kw: jobs.append(kw) or {"npz": str(tmp_path / "s.npz")})
    monkeypatch.setattr(evaluate, "evaluate_npz", lambda *a, **kw: scored.append(a) or {})
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **kw: None)
    # No export is needed: only its objective and size are read before the (stubbed) job.
    monkeypatch.setattr(evaluate.export, "read_info",
                        lambda d: {"objective": {"name": "ddpm"}, "data": {"image_size": 256}})
    evaluate.evaluate_from_config(config, tmp_path)
    job = jobs[0]
    assert (job["num_images"], job["sampler"], job["steps"], job["cfg_scale"], job["dtype"],
            job["guide_all_channels"]) == (50_000, "ddpm", "250", 1.0, "float32", False)


def test_evaluate_checks_everything_before_sampling(tmp_path, monkeypatch):
    """Sampling 50,000 images takes hours: a reference of another resolution, a bad scoring
    setting, or a result file holding another sample file's scores stop the command first."""
    from udit_jax import sample
    from udit_jax.evaluation import evaluate
    from tests.test_sample import write_pixel_export
    work = tmp_path / "work"
    write_pixel_export(work / "export")                  # 8x8 images
    np.savez(tmp_path / "ref16.npz", arr_0=np.zeros((12, 16, 16, 3), np.uint8))
    (tmp_path / "inception.pth").write_bytes(b"x")
    jobs = []
    monkeypatch.setattr(sample, "run_sampling_job", lambda *a, **kw: jobs.append(kw))

    def run(**eval_fields):
        config = config_lib.base_config()
        config.eval.update(dict(dict(reference_npz=str(tmp_path / "ref16.npz"), num_samples=12,
                                     inception_weights=str(tmp_path / "inception.pth")),
                                **eval_fields))
        return evaluate.evaluate_from_config(config, work)

    with pytest.raises(ValueError, match="samples are 8x8 but the reference .*ref16.npz is 16x16"):
        run()
    with pytest.raises(ValueError, match="config.eval.fid_method='bogus'"):
        run(fid_method="bogus")
    with pytest.raises(ValueError, match="config.eval.is_split_size=0"):
        run(is_split_size=0)
    assert jobs == []
    # Two sampling jobs' files are both samples.npz: the job's folder names the result, and a
    # result of another file is never replaced.
    job = tmp_path / "ddpm250-job"
    job.mkdir()
    (job / "job.json").write_text("{}")
    np.savez(job / "samples.npz", arr_0=np.zeros((12, 8, 8, 3), np.uint8))
    (work / "eval").mkdir()
    (work / "eval" / "ddpm250-job.json").write_text(json.dumps({"sample_path": "/other/samples.npz"}))
    with pytest.raises(FileExistsError, match="holds the scores of /other/samples.npz"):
        run(sample_npz=str(job / "samples.npz"))


def test_metric_names_carry_the_sample_count():
    from udit_jax.evaluation import evaluate
    assert evaluate.metric_names(50_000)["fid"] == "FID-50K"
    assert evaluate.metric_names(5_000) == {"fid": "FID-5K", "sfid": "sFID-5K",
                                            "inception_score": "IS-5K"}
    table = evaluate.format_table({"num_samples": 5_000, "fid": 9.5, "sfid": 1.0,
                                   "inception_score": 2.0})
    assert "FID-5K" in table and "FID-50K" not in table


def test_sampling_job_with_another_vae_or_dtype_does_not_reuse_images(tmp_path):
    """The job directory's identity covers the VAE weights and the dtype: another job is
    refused there instead of topping up (or merging into) the first one's samples.npz."""
    from udit_jax import export, models, sample
    from tests.test_sample import UDIT, random_params
    arguments, _, _ = _tiny_vae_weights(tmp_path / "vae_a.safetensors", seed=1)
    _tiny_vae_weights(tmp_path / "vae_b.safetensors", seed=2)
    model = models.build_model("U-DiT", input_size=8, in_channels=4, **UDIT)
    export.write_export(tmp_path / "export", model, random_params(model, 0),
                        diffusion={"noise_schedule": "linear", "diffusion_steps": 1000,
                                   "learn_sigma": True},
                        data={"space": "latent", "image_size": 64, "channels": 3,
                              "num_classes": 3, "latent_scale": 0.18215},
                        vae={"arguments": arguments, "weights": str(tmp_path / "vae_a.safetensors")},
                        metadata={})
    job = dict(num_images=2, sampler="dpm", steps="2", max_batches=0, write_png=False)
    out = tmp_path / "samples"
    first = sample.run_sampling_job(tmp_path / "export", out, **job)   # writes job.json only
    assert not first["finished"]
    spec = json.loads((out / "job.json").read_text())
    assert spec["dtype"] == "float32" and len(spec["vae_weights_sha256"]) == 64
    with pytest.raises(ValueError, match="differs in vae_weights_sha256"):
        sample.run_sampling_job(tmp_path / "export", out, **job,
                                vae_weights=str(tmp_path / "vae_b.safetensors"))
    with pytest.raises(ValueError, match="differs in dtype"):
        sample.run_sampling_job(tmp_path / "export", out, **job, dtype="bfloat16")
    with pytest.raises(ValueError, match="cfg_scale=-2.0 must be finite and >= 0"):
        sample.run_sampling_job(tmp_path / "export", tmp_path / "other", **job, cfg_scale=-2.0)


# ----------------------------------------------------------------------------------------
# 3. In-loop evaluation checked at the start of training.

def test_in_loop_evaluation_requirements_fail_at_start(tmp_path):
    from udit_jax import train
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    (tmp_path / "inception.safetensors").write_bytes(b"not weights")
    base = {"eval_every_steps": 10, "eval.reference_npz": str(ref),
            "eval.inception_weights": str(tmp_path / "inception.safetensors")}
    cases = [
        ({"eval.reference_npz": str(tmp_path / "missing.npz")}, FileNotFoundError,
         "reference_npz=.*missing.npz not found"),
        ({}, ValueError, "inception.safetensors is not a valid .safetensors file"),
        ({"eval.inception_weights": ""}, ValueError, "needs config.eval.inception_weights"),
        ({"model.kwargs.class_dropout_prob": 0.0, "sample_every_steps": 0,
          "eval.cfg_scale": 1.5}, ValueError, "eval.cfg_scale > 1 needs the null-class embedding"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            train.validate(demo_config(**{**base, **overrides}), tmp_path / "work")


# ----------------------------------------------------------------------------------------
# 4. Bad values, list overrides, file errors, transient read errors.

@pytest.mark.parametrize("field, value, message", [
    ("optimizer.learning_rate", -0.001, "positive finite"),
    ("optimizer.learning_rate", float("nan"), "positive finite"),
    ("optimizer.learning_rate", float("inf"), "positive finite"),
    ("optimizer.warmup_steps", -5, "non-negative"),
    ("sample.cfg_scale", -2.0, "guidance scales are finite and >= 0"),
    ("eval.cfg_scale", -1.0, "guidance scales are finite and >= 0"),
    ("data.image_size", 0, "positive integer"),
    ("data.num_classes", 0, "positive integer"),
    ("seed", -1, "non-negative"),
    ("model.kwargs.num_heads", 0, "positive integer"),
    ("model.remat_keeps", "everything", "use one of"),
    ("model.matmul_precision", "half", "use one of"),
    # keep=0 made orbax delete every checkpoint of the workdir at the next save.
    ("checkpoint.keep", 0, "positive integer"),
    ("sample.num_images", -3, "non-negative integer"),
    ("checkpoint.keep_every", -1, "non-negative integer"),
    ("sample_every_steps", -1, "non-negative integer"),
    ("eval_every_steps", -1, "non-negative integer"),
    ("eval.quality", "foo", "use 'fashion_mnist' or ''"),   # before the workdir records it
])
def test_bad_values_fail_before_compiling(field, value, message, tmp_path):
    from udit_jax import train
    with pytest.raises(ValueError, match=rf"^{field}=.*{message}"):
        train.validate(demo_config(**{field: value}), tmp_path / "work")


def test_cudnn_attention_off_gpus_or_in_float32_fails_before_compiling(tmp_path):
    """The fused cuDNN attention has bfloat16/float16 kernels for NVIDIA GPUs only."""
    from udit_jax import train
    cudnn = {"model.kwargs.attention_impl": "cudnn"}
    with pytest.raises(ValueError, match=r"^model.dtype='float32': .*'cudnn'.*bfloat16 or float16"):
        train.validate(demo_config(**cudnn, **{"model.dtype": "float32"}), tmp_path / "work")
    with pytest.raises(ValueError, match=r"^eval.dtype='float32': .*'cudnn'"):
        train.validate(demo_config(**cudnn, **{"model.dtype": "bfloat16", "eval.dtype": "float32"}),
                       tmp_path / "work")
    with pytest.raises(ValueError, match=r"fused attention of NVIDIA GPUs, and these devices are cpu"):
        train.validate(demo_config(**cudnn, **{"model.dtype": "bfloat16", "eval.dtype": "bfloat16"}),
                       tmp_path / "work")


def test_cfg_scale_below_one_is_no_guidance_and_logged(tmp_path, caplog):
    """The sampler (previews, in-loop evaluation, jobs) says so when it is built."""
    from udit_jax import train
    config = demo_config(**{"sample.cfg_scale": 0.5})
    model = train.validate(config, tmp_path / "work")
    with caplog.at_level("INFO"):
        train.make_preview(config, model, config_lib.make_mesh(config))
    assert "cfg_scale=0.5: no classifier-free guidance is applied" in caplog.text


def test_list_fields_override_from_the_command_line():
    from absl import flags
    from ml_collections import config_flags
    argv = ["prog", f"--config={REPO / 'configs' / 'udit_b.py'}", "--config.sample.classes=0,1,2"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)   # override flags are found in sys_argv
    values(argv)
    assert tuple(values.config.sample.classes) == (0, 1, 2)


def test_file_errors_name_the_file(tmp_path):
    from udit_jax.convert import load_state_dict
    from udit_jax.data.sources import FashionMnistSource
    garbage = tmp_path / "vae.safetensors"
    garbage.write_bytes(b"definitely not a safetensors header" * 3)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, w=np.array([{"code": 1}], dtype=object))
    not_zip = tmp_path / "not_zip.npz"
    not_zip.write_bytes(b"hello")
    for path, what in [(garbage, "not a valid .safetensors file"), (empty, "is empty"),
                       (pickled, "pickled"), (not_zip, "not an .npz archive")]:
        with pytest.raises(ValueError, match=f"{path.name}.*{what}|{what}.*{path.name}"):
            load_state_dict(path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00corrupt")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00corrupt")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is corrupt"):
        FashionMnistSource(tmp_path)


def test_transient_oserror_is_retried_before_an_image_counts_as_bad(tmp_path, monkeypatch):
    from udit_jax.data import loader, sources
    monkeypatch.setattr(sources, "READ_BACKOFF_S", 0.0)
    source = sources.ClassFolderSource(class_folders(tmp_path, 2))
    failures = {0: 2, 3: sources.READ_ATTEMPTS - 1}   # item -> OSErrors before it reads
    read = source.read

    def flaky(index):
        if failures.get(index, 0) > 0:
            failures[index] -= 1
            raise OSError(5, "Input/output error (transient)")
        return read(index)

    monkeypatch.setattr(source, "read", flaky)
    table = loader.image_table_from_source(source, 16, min_image_side=8, max_bad_fraction=0.0)
    assert len(table) == 4 and not any(failures.values())


# ----------------------------------------------------------------------------------------
# 5. The export -> official weights -> import round trip, as one command.

def test_export_official_weights_import_round_trip(tmp_path, capsys):
    import jax
    from udit_jax import export, models
    from tests.test_sample import UDIT, random_params
    model = models.build_model("U-DiT", input_size=8, in_channels=1, **UDIT, cfg_channels=None)
    params = random_params(model, 0)
    export.write_export(tmp_path / "demo_export", model, params,
                        diffusion={"noise_schedule": "linear", "diffusion_steps": 1000,
                                   "learn_sigma": True},
                        data={"space": "pixel", "image_size": 8, "channels": 1, "num_classes": 3,
                              "latent_scale": 0.18215}, vae=None, metadata={},
                        torch_weights=True)
    # The documented command: the description comes from export.json.
    assert export.main([f"--from_export={tmp_path / 'demo_export'}",
                        f"--out={tmp_path / 'reimported'}"]) == 0
    _, again, info = export.load_export(tmp_path / "reimported")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), params)
    assert info["model"]["kwargs"] == json.loads(
        (tmp_path / "demo_export" / "export.json").read_text())["model"]["kwargs"]
    # The command: the model description copied from export.json, num_classes included.
    kwargs = json.loads((tmp_path / "demo_export" / "export.json").read_text())["model"]["kwargs"]
    assert export.main([f"--import_weights={tmp_path / 'demo_export' / export.TORCH_WEIGHTS_FILE}",
                        "--model=U-DiT", "--space=pixel", "--image_size=8", "--channels=1",
                        "--num_classes=3", f"--model_kwargs={json.dumps(kwargs)}",
                        f"--out={tmp_path / 'copied'}"]) == 0
    # Disagreements and bad files: one line, exit 1.
    capsys.readouterr()
    assert export.main([f"--from_export={tmp_path / 'demo_export'}", f"--out={tmp_path / 'x'}",
                        '--model_kwargs={"input_size": 16}']) == 1
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert export.main([f"--import_weights={empty}", "--model=U-DiT-S",
                        f"--out={tmp_path / 'y'}"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "input_size" in lines[0] and "empty.safetensors" in lines[1]


# ----------------------------------------------------------------------------------------
# Every expected error: one line on stderr, non-zero exit, no traceback.

_DRIVER = r"""
import json, os, sys, tempfile
import jax  # imported, no backend started before fork
from udit_jax import data, evaluation, export, main, sample, train  # noqa: F401
results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["udit_jax.main"] + argv
            try:
                main.run()
            except SystemExit as e:
                os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        results.append({"rc": os.waitstatus_to_exitcode(status),
                        "stderr": err.read().decode(errors="replace")})
print(json.dumps(results))
"""


def bad_inputs(tmp: pathlib.Path) -> list[tuple[list[str], str]]:
    """(arguments, what the one line says): every entry fails before anything compiles."""
    demo = ["--config=configs/demo.py", f"--workdir={tmp / 'work'}"]
    (tmp / "fmnist").mkdir()
    (tmp / "fmnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00bad")
    (tmp / "fmnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00bad")
    (tmp / "garbage.safetensors").write_bytes(b"garbage" * 10)
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "broken.py").write_text("def get_config(:\n")
    folders = class_folders(tmp / "images", 3)
    return [
        (demo + ["--config.optimizer.learning_rate=-0.001"], "optimizer.learning_rate=-0.001"),
        (demo + ["--config.optimizer.learning_rate=nan"], "optimizer.learning_rate=nan"),
        (demo + ["--config.optimizer.warmup_steps=-5"], "optimizer.warmup_steps=-5"),
        (demo + ["--config.sample.cfg_scale=-2"], "sample.cfg_scale=-2.0"),
        (demo + ["--config.data.image_size=0"], "data.image_size=0"),
        (demo + ["--config.data.num_classes=0"], "data.num_classes=0"),
        (demo + ["--config.seed=-1"], "seed=-1"),
        (demo + ["--config.model.kwargs.foo=1"], "no field 'foo'"),
        # Only the misspelt flag is named, with ml_collections' suggestion.
        (demo + ["--config.totl_steps=5", "--config.total_steps=20"],
         "error: --config.totl_steps: the config has no field 'totl_steps'. Did you mean "
         '"total_steps"'),
        (demo + ["--config.checkpoint.keep=0"], "checkpoint.keep=0 must be a positive integer"),
        (demo + ["--config.model.kwargs.num_heads=0"], "model.kwargs.num_heads=0"),
        (demo + ["--config.model.name=Nope"], "unknown model name 'Nope'"),
        (demo + ["--config.sample.classes=a,b"], "sample.classes"),
        (demo + ["--config.data.num_classes=5"], "sample.classes [5, 6, 7, 8, 9] are outside"),
        (demo + [f"--config.data.dir={tmp / 'fmnist'}"], "train-images-idx3-ubyte.gz is corrupt"),
        (demo + ["--config.data.source=folder", f"--config.data.dir={folders}",
                 "--config.data.num_classes=2", "--config.sample.classes=0,1",
                 "--config.eval.quality="], "data source has 3 classes"),
        (demo + ["--config.data.source=folder", f"--config.data.dir={folders}"],
         "eval.quality='fashion_mnist' scores Fashion-MNIST pixel samples"),
        (demo + ["--config.eval_every_steps=10"], "needs config.eval.reference_npz"),
        (demo + ["--config.data.channels=3"], "data.channels=3 but the images of "
                                              "data.source='fashion_mnist' have 1 channel(s)"),
        (demo + ["--mode=encode", "--config.data.space=latent",
                 f"--config.vae.weights={tmp / 'garbage.safetensors'}"],
         "garbage.safetensors is not a valid .safetensors file"),
        (demo + ["--mode=encode", "--config.data.space=latent",
                 f"--config.vae.weights={tmp / 'empty.safetensors'}"], "empty.safetensors is empty"),
        (demo + ["--mode=encode", "--config.data.image_size=0"], "data.image_size=0"),
        (demo + ["--mode=sample", "--config.sample.cfg_scale=-1"], "sample.cfg_scale=-1.0"),
        (demo + ["--mode=sample"], "is not an export directory"),
        (demo + ["--mode=export"], "no training checkpoints"),
        (demo + ["--mode=evaluate", "--config.eval.quality="],
         "--mode=evaluate needs config.eval.reference_npz"),
        (demo + ["--mode=evaluate"], "is not an export directory"),   # the demo's quality score
        (["--config=configs/demo.py", "--workdir=/proc/udit_jax_not_writable"],
         "--workdir: cannot write to /proc/udit_jax_not_writable"),
        ([f"--config={tmp / 'broken.py'}", f"--workdir={tmp / 'work'}"], "line 1: invalid syntax"),
        # absl's own flag errors (absl prints two lines, "FATAL Flags parsing error" + help).
        (demo + ["--config.optimizer.learning_rate=abc"], "learning_rate"),
        (["--config=configs/demo.py"], "--workdir must have a value"),
        (demo + ["--mode=bogus"], "--mode"),
        (demo + ["--num_processes=two"], "--num_processes"),
    ]


def test_main_reports_every_expected_error_in_one_line(tmp_path):
    cases = bad_inputs(tmp_path)
    debug = cases[0][0] + ["--debug"]   # --debug: the traceback instead
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps([a for a, _ in cases] + [debug])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *results, debugged = json.loads(proc.stdout)
    assert debugged["rc"] == 1 and "Traceback" in debugged["stderr"]
    for (argv, message), result in zip(cases, results):
        err = result["stderr"]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert result["rc"] == 1 and "Traceback" not in err, (argv, err[-2000:])
        assert len(errors) == 1 and message in errors[0], (argv, err[-2000:])
        assert "FATAL" not in err and "Pass --helpshort" not in err, (argv, err[-2000:])


def test_export_round_trip_keeps_the_objective_and_diffusion(tmp_path, capsys):
    """--from_export rebuilds the export it reads: a flow-matching model stays one (sampled as
    an eps model it would give wrong images without an error), its schedule stays its own, and
    flags that disagree with the export, or an export without torch weights, are one line."""
    from udit_jax import export, models
    from tests.test_sample import UDIT, random_params
    model = models.build_model("U-DiT", input_size=8, in_channels=1, **UDIT, cfg_channels=None)
    objective = {"name": "transport", "transport": {"path_type": "Linear", "prediction": "velocity",
                                                    "loss_weight": None, "train_eps": 0.0,
                                                    "sample_eps": 0.0}}
    diffusion = {"noise_schedule": "squaredcos_cap_v2", "diffusion_steps": 500, "learn_sigma": True}
    data = {"space": "pixel", "image_size": 8, "channels": 1, "num_classes": 3, "latent_scale": 0.5}
    for name, weights in (("src", True), ("no_weights", False)):
        export.write_export(tmp_path / name, model, random_params(model, 0), diffusion=diffusion,
                            objective=objective, data=data, vae=None, metadata={},
                            torch_weights=weights)
    assert export.main([f"--from_export={tmp_path / 'src'}", f"--out={tmp_path / 'again'}"]) == 0
    before, after = (json.loads((tmp_path / d / "export.json").read_text()) for d in ("src", "again"))
    for section in ("model", "diffusion", "objective", "data", "vae"):
        assert after[section] == before[section], section
    capsys.readouterr()
    assert export.main([f"--from_export={tmp_path / 'src'}", "--image_size=16", "--space=pixel",
                        f"--out={tmp_path / 'x'}"]) == 1
    assert "--image_size=16 (the export has 8)" in capsys.readouterr().err
    assert export.main([f"--from_export={tmp_path / 'src'}", "--channels=3",
                        f"--out={tmp_path / 'x'}"]) == 1
    assert "--channels=3 (the export has 1)" in capsys.readouterr().err
    assert export.main([f"--from_export={tmp_path / 'no_weights'}", f"--out={tmp_path / 'y'}"]) == 1
    assert "--config.export.torch_weights=True" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_inception_errors_are_one_line(tmp_path, capsys):
    from udit_jax.evaluation import convert_inception
    assert convert_inception.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.npz")]) == 1
    np.savez(tmp_path / "other.npz", w=np.zeros(3, np.float32))
    assert convert_inception.main([str(tmp_path / "other.npz"), str(tmp_path / "out.npz")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "missing.pth" in lines[0] and "does not fit pytorch-fid's FID InceptionV3" in lines[1]
    assert not (tmp_path / "out.npz").exists()


def test_convert_inception_command_prints_only_its_error(tmp_path):
    # As users type it: `python -m` of a module the package imported first made runpy warn.
    run = subprocess.run([sys.executable, "-m", "udit_jax.evaluation.convert_inception",
                          str(tmp_path / "missing.pth"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [line for line in run.stderr.strip().splitlines()
                                               if line.startswith("error: ")], run.stderr
    assert "RuntimeWarning" not in run.stderr and "missing.pth" in run.stderr
