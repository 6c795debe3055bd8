"""Training: loss goes down, sharding does not change the math, resume is exact, checkpoints
survive corruption, preemption and a change of device count, bad configs fail early.

A tiny DiT on learnable synthetic data (data.source='synthetic'). Multi-device and
multi-process runs happen in subprocesses (this file run as a script is the worker); they
share a persistent compilation cache so the same program compiles once.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from udit_jax import config as config_lib
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

# Flat overrides of config_lib.base_config(): a ~30K-parameter DiT on 8x8x1 synthetic images.
# No label dropout: its masks are drawn per microbatch, which would make gradient
# accumulation differ from the whole batch (test_gradient_accumulation_...).
TINY = {
    "model.name": "DiT",
    "model.kwargs": {"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2,
                     "class_dropout_prob": 0.0},
    "data.source": "synthetic", "data.space": "pixel", "data.image_size": 8,
    "data.channels": 1, "data.num_classes": 3,
    "batch_size": 8, "total_steps": 6, "log_every_steps": 3, "checkpoint_every_steps": 3,
    "sample_every_steps": 0, "optimizer.learning_rate": 3e-3, "optimizer.ema_decay": 0.9,
    "checkpoint.keep": 5, "checkpoint.keep_every": 0,
}


def make_config(overrides: dict | None = None):
    from udit_jax import train
    config = config_lib.base_config()
    config.update_from_flattened_dict({**TINY, **(overrides or {})})
    return config


def flat_state(state) -> dict[str, np.ndarray]:
    import jax
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def assert_identical(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def assert_close(a: dict, b: dict, what: str, rtol=2e-5, atol=2e-6):
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


def objective(config, params) -> float:
    """The hybrid loss at fixed t/noise/labels on synthetic batches the runs never saw,
    computed here from the model and diffusion directly (not through the train step)."""
    import jax
    import jax.numpy as jnp
    from udit_jax import train
    model, d = config_lib.build_model(config), config_lib.make_diffusion(config)
    batches = train.SyntheticBatches(config, 0, 1)
    batches.set_state({"index": 1000})
    data = [next(batches) for _ in range(4)]
    x0 = jnp.concatenate([b["image"] for b in data])
    y = jnp.concatenate([b["label"] for b in data])
    kt, kn = jax.random.split(jax.random.PRNGKey(123))
    t = jax.random.randint(kt, (x0.shape[0],), 0, d.num_timesteps)
    noise = jax.random.normal(kn, x0.shape)

    @jax.jit
    def loss(params):
        terms = d.training_losses(lambda x, tt, y: model.apply({"params": params}, x, tt, y), x0, t,
                                  noise=noise, model_kwargs={"y": y})
        return jnp.mean(terms["loss"])

    return float(loss(params))


def initial_params(config):
    import jax
    from udit_jax import models, train
    return models.init_params(config_lib.build_model(config), jax.random.PRNGKey(config.seed))


# ----------------------------------------------------------------------------------------
# Worker (subprocesses): `python tests/test_train.py '<json job>'`

def _worker(job: dict) -> None:
    import jax
    if job.get("coordinator"):
        from udit_jax import parallel
        parallel.initialize_distributed(job["coordinator"], job["num_processes"], job["process_id"])
    from udit_jax import checkpoints, train
    from etils import epath
    out = {}
    for i, run in enumerate(job["runs"]):
        config = make_config(run.get("overrides"))
        if run["kind"] == "train":
            make_preview, seen = train.make_preview, []

            def recording_preview(*args, **kwargs):
                # Records whether the EMA each preview is given has any leaf split over devices.
                preview = make_preview(*args, **kwargs)
                if preview is None:
                    return None

                def record(ema):
                    seen.append(any(any(a is not None for a in leaf.sharding.spec)
                                    for leaf in jax.tree.leaves(ema) if leaf.ndim))
                    return preview(ema)
                return record

            train.make_preview = recording_preview
            state = train.train_and_evaluate(config, run["workdir"])
            train.make_preview = make_preview
            out[f"preview_ema_split_{i}"] = seen
            if jax.process_index() == 0:
                np.savez(run["out"], **flat_state(state))
            if run.get("report_sharding"):
                def sharded(tree):
                    return sum(any(a is not None for a in leaf.sharding.spec)
                               for leaf in jax.tree.leaves(tree) if leaf.ndim)
                prefix = run.get("report_sharding") if isinstance(run["report_sharding"], str) else ""
                out[prefix + "sharded_params"] = sharded(state.params)
                out[prefix + "sharded_ema"] = sharded(state.ema_params)
                out[prefix + "sharded_opt_state"] = sharded(state.opt_state)
                out["num_params"] = len(jax.tree.leaves(state.params))
        elif run["kind"] == "restore":
            model = config_lib.build_model(config)
            tx, _ = config_lib.make_optimizer(config.optimizer)
            mesh = train.parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
            target = train.abstract_state_on_mesh(config, model, tx, mesh)
            ckpt = checkpoints.Checkpointer(epath.Path(run["workdir"]), keep=5, keep_every=None)
            step, state = ckpt.restore(target, train.SyntheticBatches(config, 0, 1))
            ckpt.close()
            prefix = run.get("prefix", "")
            out[prefix + "restored_step"] = step
            out[prefix + "restored_devices"] = len(
                jax.tree.leaves(state.params)[0].sharding.device_set)
            np.savez(run["out"], **flat_state(state))
            _, ema, ema_step = train.restore_ema_params(config, run["workdir"])
            out[prefix + "ema_matches"] = ema_step == step and all(
                np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(ema)),
                                                     jax.tree.leaves(jax.device_get(state.ema_params))))
        elif run["kind"] == "invalid":
            try:
                train.validate(config, epath.Path(run["workdir"]))
                out[f"error_{i}"] = None
            except ValueError as e:
                out[f"error_{i}"] = str(e)
    if jax.process_index() == 0:
        pathlib.Path(job["report"]).write_text(json.dumps(out))


def _env(devices: int, cache_dir: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _spawn(job: dict, devices: int, cache_dir, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, json.dumps(job)], cwd=REPO,
                            env=_env(devices, cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def run_worker(job: dict, devices: int, cache_dir, timeout=600) -> dict:
    proc = _spawn(job, devices, cache_dir)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-6000:]
    return json.loads(pathlib.Path(job["report"]).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


# ----------------------------------------------------------------------------------------
# One device, in process: loss decreases, exact resume, corrupted checkpoint fallback.

@pytest.fixture(scope="module")
def single_device_runs(tmp_path_factory):
    """N steps straight; then a restart from the straight run's N/2 checkpoint to N."""
    import shutil
    from udit_jax import train
    root = tmp_path_factory.mktemp("single")
    config = make_config()
    half = config.total_steps // 2
    # The straight run also writes the EMA sample grid at its last step.
    straight = train.train_and_evaluate(make_config({
        "sample_every_steps": config.total_steps, "sample.classes": [2, 0, 1],
        "sample.per_class": 4, "sample.sampler": "dpm", "sample.steps": "5",
        "sample.cfg_scale": 1.0}), str(root / "straight"))
    # The straight run wrote checkpoints at N/2 and N; a run that stopped at N/2 has only the
    # first (test_sigterm covers stopping mid-run for real).
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "straight" / "checkpoints" / str(half),
                    root / "resumed" / "checkpoints" / str(half))
    resumed = train.train_and_evaluate(config, str(root / "resumed"))
    return {"root": root, "config": config, "straight": flat_state(straight),
            "resumed": flat_state(resumed), "straight_state": straight}


def test_single_device_training_lowers_the_loss(single_device_runs):
    config = single_device_runs["config"]
    state = single_device_runs["straight_state"]
    before = objective(config, initial_params(config))
    after = objective(config, state.params)
    assert int(state.step) == config.total_steps
    assert after < 0.9 * before, (before, after)


def test_sample_grid_has_a_row_per_class(single_device_runs):
    from PIL import Image
    grid = np.asarray(Image.open(single_device_runs["root"] / "straight" / "samples" /
                                 f"step_{TINY['total_steps']:08d}.png"))
    size = TINY["data.image_size"]
    assert grid.shape == (3 * size, 4 * size) and grid.dtype == np.uint8  # 3 classes x 4, grey
    assert grid.std() > 0


def test_resume_is_bit_identical(single_device_runs):
    straight, resumed = single_device_runs["straight"], single_device_runs["resumed"]
    assert any(".ema_params" in k for k in straight) and any(".opt_state" in k for k in straight)
    assert_identical(resumed, straight, "N straight vs N/2 + restart + N/2")


def test_corrupted_latest_checkpoint_falls_back(single_device_runs):
    from etils import epath
    from udit_jax import checkpoints, train
    config = single_device_runs["config"]
    workdir = single_device_runs["root"] / "resumed"
    latest = workdir / "checkpoints" / "6" / "state"
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    model = config_lib.build_model(config)
    tx, _ = config_lib.make_optimizer(config.optimizer)
    target = train.abstract_state_on_mesh(config, model, tx, train.parallel.make_mesh())
    ckpt = checkpoints.Checkpointer(epath.Path(workdir), keep=5, keep_every=None)
    iterator = train.SyntheticBatches(config, 0, 1)
    step, state = ckpt.restore(target, iterator)
    ckpt.close()
    assert step == 3
    assert iterator.get_state() == {"index": 3}
    assert int(state.step) == 3
    assert (workdir / checkpoints.SET_ASIDE_DIR / "6.corrupt.1").is_dir()
    assert not (workdir / "checkpoints" / "6").exists()


def test_initial_state_does_not_depend_on_its_compile_options():
    """train.init_state compiles its one-off program with XLA:CPU's cheapest backend
    optimisation: the state equals the same program compiled with the defaults (up to
    rounding), EMA = params, zero moments, step 0."""
    import flax.linen as nn
    import jax
    from udit_jax import train
    config = make_config()
    trainer = train.make_trainer(config)
    got = trainer.init_state()
    want = jax.jit(lambda: nn.unbox(train._init_state_boxed(trainer.model, trainer.tx,
                                                           config.seed)))()
    got_flat, want_flat = flat_state(got), flat_state(want)
    assert got_flat.keys() == want_flat.keys()
    for k in want_flat:
        np.testing.assert_allclose(got_flat[k], want_flat[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert_identical(flat_state(got.params), flat_state(got.ema_params), "EMA starts at params")
    assert int(got.step) == 0
    moments = [leaf for leaf in jax.tree.leaves(got.opt_state) if np.ndim(leaf) > 0]
    assert moments and not any(np.asarray(m).any() for m in moments)


@pytest.mark.parametrize("family", ["U-DiT", "DiT"])
def test_train_step_traces_only_its_platforms_forms(family):
    """The train step traces the models' forms for its mesh's platform only
    (models.forms_for), with no platform switch left in its program. Under
    lax.platform_dependent, autodiff gives the forward the residuals of every platform's form
    (other platforms' as zeros), and remat's optimisation barrier kept those zeros in HBM:
    U-DiT-L's v5e-8 remat step by XLA's cost model, 548 ms with this, 576 without."""
    from udit_jax import train
    model = ({"model.name": "U-DiT", "model.kwargs": dict(
        hidden_size=16, depth=(1, 0, 0, 0, 0), num_heads=1, mlp_ratio=2)} if family == "U-DiT"
        else {})
    config = make_config({**model, "model.remat": True, "model.dtype": "bfloat16"})
    trainer = train.make_trainer(config)
    local = next(train.SyntheticBatches(config, 0, 1))
    text = trainer.jit_step(local).lower(trainer.restore_target(),
                                         trainer.global_batch(local)).as_text()
    assert "stablehlo.optimization_barrier" in text    # remat'd
    assert "stablehlo.case" not in text


def test_bfloat16_compute_keeps_float32_state(tmp_path):
    from udit_jax import train
    config = make_config({"model.dtype": "bfloat16", "model.remat": True, "total_steps": 2,
                          "checkpoint_every_steps": 2})
    state = flat_state(train.train_and_evaluate(config, str(tmp_path)))
    floats = {k: v for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    assert floats and all(v.dtype == np.float32 for v in floats.values())
    assert all(np.isfinite(v).all() for v in floats.values())
    # Zero-initialised params (adaLN, final layer) are zero for any init key: updates move them.
    zero_at_init = [k for k, v in flat_state(initial_params(config)).items() if not v.any()]
    assert zero_at_init and any(state[".params" + k].any() for k in zero_at_init)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from udit_jax import train

    class PoisonAtThirdBatch(train.SyntheticBatches):
        def __next__(self):
            batch = super().__next__()
            if self.index == 3:
                batch["image"] = np.full_like(batch["image"], np.nan)
            return batch

    monkeypatch.setattr(train, "SyntheticBatches", PoisonAtThirdBatch)
    with pytest.raises(train.NonFiniteError, match=r"step 3 .*last good checkpoint \(step 2\)"):
        train.train_and_evaluate(make_config({"checkpoint_every_steps": 2}), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_gradient_accumulation_matches_the_whole_batch(tmp_path, single_device_runs):
    from udit_jax import train
    state = train.train_and_evaluate(make_config({"optimizer.grad_accum_steps": 2}), str(tmp_path))
    assert_close(flat_state(state), single_device_runs["straight"], "grad_accum_steps=2 vs 1")


# ----------------------------------------------------------------------------------------
# Validation before compiling.

@pytest.mark.parametrize("overrides, message", [
    ({"model.name": "DiT-Q/3"}, "unknown model name"),
    ({"model.name": "DiT", "model.scan_blocks": True}, r"add --config.model.scan_blocks=False"),
    ({"data.image_size": 9}, "input_size"),                       # 9 is not divisible by patch 2
    ({"optimizer.grad_accum_steps": 3}, "divisible by optimizer.grad_accum_steps"),
    ({"data.space": "latents"}, "data.space"),
    ({"mesh.rules": "tensor"}, "mesh.rules"),
    ({"sample_every_steps": 10, "sample.classes": [0], "sample.cfg_scale": 4.0}, "null-class"),
    ({"sample_every_steps": 10}, "sample.classes .* are outside"),
])
def test_invalid_configs_fail_before_compiling(tmp_path, overrides, message):
    from etils import epath
    from udit_jax import train
    with pytest.raises(ValueError, match=message):
        train.validate(make_config(overrides), epath.Path(tmp_path))


# XLA:TPU's out-of-memory error, as the compiler words it (test_compile's real v5e compile
# checks the parsing of the compiler's own message).
_TPU_OOM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
            "space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")


@pytest.mark.parametrize("message, expected", [
    (_TPU_OOM, r"the train step of DiT needs 20\.50 GiB per device but a .* has 15\.75 GiB "
               r"\(global batch 8, 8 per device, mesh "
               r".*try --config\.mesh\.rules=fsdp.*--config\.mesh\.shard_update=True.*"
               r"--config\.model\.remat=True.*per-chip batch.*--mode=compile"),
    ("INTERNAL: some other failure", None),
])
def test_a_step_too_large_for_the_device_stops_with_the_knobs(tmp_path, monkeypatch, message,
                                                             expected):
    """An out-of-memory error from the first step's compile (a CPU has no such limit, so the
    error is injected) is one message with the sizes and the knobs; other errors pass as they
    are; nothing is saved."""
    import jax
    from udit_jax import memory_fit, train

    def failing_step(*args, **kwargs):
        def step(state, batch):
            raise jax.errors.JaxRuntimeError(message)
        return step
    monkeypatch.setattr(train, "load_or_jit_step", failing_step)
    workdir = tmp_path / "run"
    if expected is None:
        with pytest.raises(jax.errors.JaxRuntimeError, match="some other failure"):
            train.train_and_evaluate(make_config(), str(workdir))
    else:
        with pytest.raises(memory_fit.DoesNotFitError, match=expected):
            train.train_and_evaluate(make_config(), str(workdir))
    assert not list((workdir / "checkpoints").glob("[0-9]*"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_config_builds_and_documents_its_command(path):
    import importlib.util
    from udit_jax import train
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert f"python -m udit_jax.main --config=configs/{path.name}" in module.__doc__
    config = module.get_config()
    assert config.keys() == config_lib.base_config().keys()   # overrides only, no new sections
    model = config_lib.build_model(config)
    latent = config.data.space == "latent"
    assert model.input_size == config.data.image_size // (8 if latent else 1)
    if config.model.name.startswith("U-DiT-"):   # unrolled: the faster step (configs/udit_l.py)
        assert not model.scan_blocks


def test_unwritable_workdir_fails_clearly(tmp_path):
    from etils import epath
    from udit_jax import train
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="--workdir: .* is under .*a_file, which is a file"):
        train.validate(make_config(), epath.Path(blocker / "workdir"))


# ----------------------------------------------------------------------------------------
# Eight simulated devices: data parallel and FSDP; restore on four devices.

@pytest.fixture(scope="module")
def eight_device_runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("eight")
    job = {"report": str(root / "report.json"), "runs": [
        {"kind": "train", "workdir": str(root / "dp"), "out": str(root / "dp.npz")},
        {"kind": "train", "workdir": str(root / "fsdp"), "out": str(root / "fsdp.npz"),
         "report_sharding": True,
         "overrides": {"mesh.data": 2, "mesh.fsdp": 4, "mesh.rules": "fsdp"}},
        {"kind": "invalid", "workdir": str(root / "bad"), "overrides": {"batch_size": 12}},
        {"kind": "train", "workdir": str(root / "split"), "out": str(root / "split.npz"),
         "report_sharding": "split_", "overrides": {
             "mesh.shard_update": True, "sample_every_steps": 6, "sample.classes": [2, 0],
             "sample.per_class": 4, "sample.sampler": "ddim", "sample.steps": "3",
             "sample.cfg_scale": 1.0}},
    ]}
    report = run_worker(job, 8, cache_dir)
    return root, report


def test_eight_devices_data_parallel_matches_one_device(eight_device_runs, single_device_runs):
    root, _ = eight_device_runs
    dp = dict(np.load(root / "dp.npz"))
    assert_close(dp, single_device_runs["straight"], "8-device data parallel vs 1 device")


def test_eight_devices_fsdp_shards_params_and_matches(eight_device_runs, single_device_runs):
    root, report = eight_device_runs
    assert report["sharded_params"] > report["num_params"] // 2, report
    fsdp = dict(np.load(root / "fsdp.npz"))
    assert_close(fsdp, single_device_runs["straight"], "8-device FSDP vs 1 device")


def test_eight_devices_split_update_shards_optimizer_state_and_matches(eight_device_runs,
                                                                       single_device_runs):
    """mesh.shard_update: params stay whole on every device, the optimizer state and the EMA
    are split over the data axis, and the run is the one-device run."""
    root, report = eight_device_runs
    assert report["split_sharded_params"] == 0, report
    assert report["split_sharded_opt_state"] > report["num_params"], report   # mu and nu
    assert report["split_sharded_ema"] > report["num_params"] // 2, report
    split = dict(np.load(root / "split.npz"))
    assert_close(split, single_device_runs["straight"], "8-device split update vs 1 device")
    # The preview sampled from the split EMA, gathered whole first.
    assert report["preview_ema_split_3"] == [False], report
    assert (root / "split" / "samples" / "step_00000006.png").exists()


def test_batch_not_divisible_by_devices_fails_clearly(eight_device_runs):
    _, report = eight_device_runs
    assert "not divisible by the 8 devices" in report["error_2"], report


def test_checkpoint_from_eight_devices_restores_on_four(eight_device_runs, cache_dir):
    root, _ = eight_device_runs
    job = {"report": str(root / "report4.json"), "runs": [
        {"kind": "restore", "workdir": str(root / "fsdp"), "out": str(root / "restored4.npz"),
         "overrides": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.rules": "fsdp"}},
        # Saved with the update split over 8 devices, restored whole on 4.
        {"kind": "restore", "workdir": str(root / "split"), "out": str(root / "split4.npz"),
         "prefix": "split_"}]}
    report = run_worker(job, 4, cache_dir)
    for prefix in ("", "split_"):
        assert report[prefix + "restored_step"] == TINY["total_steps"]
        assert report[prefix + "restored_devices"] == 4
        assert report[prefix + "ema_matches"]
    assert_identical(dict(np.load(root / "restored4.npz")), dict(np.load(root / "fsdp.npz")),
                     "restored on 4 devices vs saved on 8")
    assert_identical(dict(np.load(root / "split4.npz")), dict(np.load(root / "split.npz")),
                     "restored whole on 4 devices vs saved split over 8")


# ----------------------------------------------------------------------------------------
# Two processes on 127.0.0.1 == one process with the same global batch.

def test_two_processes_match_one_process(tmp_path, cache_dir, single_device_runs):
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        job = {"coordinator": coordinator, "num_processes": 2, "process_id": pid,
               "report": str(tmp_path / "report.json"),
               "runs": [{"kind": "train", "workdir": str(tmp_path / "work"),
                         "out": str(tmp_path / "two.npz")}]}
        procs.append(_spawn(job, 1, cache_dir))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
    assert_close(dict(np.load(tmp_path / "two.npz")), single_device_runs["straight"],
                 "2 processes vs 1 process")
    # Each process wrote its own data-iterator state into the checkpoint.
    data_dir = tmp_path / "work" / "checkpoints" / str(TINY["total_steps"]) / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == ["process_0-of-2.json",
                                                              "process_1-of-2.json"]


# ----------------------------------------------------------------------------------------
# SIGTERM through the real command line: checkpoint at the current step, clean exit.

def _write_config_file(path: pathlib.Path, overrides: dict) -> pathlib.Path:
    path.write_text(
        "import json\nfrom udit_jax import config as config_lib\n\n\ndef get_config():\n"
        "    config = config_lib.base_config()\n"
        f"    for key, value in json.loads({json.dumps({**TINY, **overrides})!r}).items():\n"
        "        *parents, leaf = key.split('.')\n        node = config\n"
        "        for p in parents:\n            node = node[p]\n        node[leaf] = value\n"
        "    return config\n")
    return path


def _main_process(config_file, workdir, cache_dir, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "udit_jax.main", f"--config={config_file}",
                             f"--workdir={workdir}", *flags], cwd=REPO, env=_env(1, cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, text: str, lines: list, timeout=600) -> None:
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return
        assert time.time() < deadline, "".join(lines[-50:])
    raise AssertionError(f"process ended before {text!r}:\n" + "".join(lines[-50:]))


_LONG_RUN = {"total_steps": 100_000, "checkpoint_every_steps": 100_000, "log_every_steps": 1}


def test_a_rerun_loads_the_train_step_from_the_compilation_cache(tmp_path):
    """The command line keeps compiled programs in compile.cache_dir (typed relative, as users
    do): the first run writes the train step there, a second run of the same config loads it
    (JAX reports the hit) and trains to the same losses."""
    config_file = _write_config_file(tmp_path / "tiny.py", {
        "total_steps": 3, "checkpoint_every_steps": 3, "log_every_steps": 1})
    env = dict(_env(1, tmp_path / "unused"), JAX_LOG_COMPILES="1")
    del env["JAX_COMPILATION_CACHE_DIR"]   # the config's directory, not the tests' shared one

    def run(workdir: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "udit_jax.main", f"--config={config_file}",
             f"--workdir={workdir}", "--config.compile.cache_dir=xla_cache"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        return output

    hit = "Persistent compilation cache hit for 'jit_train_step'"
    first = run("first")
    assert hit not in first
    assert any(p.name.startswith("jit_train_step-") for p in (tmp_path / "xla_cache").iterdir())
    second = run("second")
    assert hit in second, second[-3000:]
    losses = lambda out: re.findall(r"step \d+/3 loss \S+", out)
    assert len(losses(first)) == 2 and losses(first) == losses(second)   # steps 2 and 3


def test_compilation_cache_off_or_unusable_leaves_jax_alone(tmp_path, caplog):
    import jax
    from udit_jax import parallel
    config = make_config()
    before = jax.config.jax_compilation_cache_dir
    config.compile.cache = False
    assert parallel.use_compilation_cache(config.compile) is None
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config.compile.cache, config.compile.cache_dir = True, str(blocker / "xla")
    with caplog.at_level("WARNING"):
        assert parallel.use_compilation_cache(config.compile) is None
    assert "compiling without a persistent cache: cannot create" in caplog.text
    assert jax.config.jax_compilation_cache_dir == before


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path, cache_dir):
    config_file = _write_config_file(tmp_path / "tiny.py", _LONG_RUN)
    workdir = tmp_path / "work"
    proc = _main_process(config_file, workdir, cache_dir, "--config.optimizer.learning_rate=1e-3")
    lines = []
    _wait_for(proc, "step 3/", lines)  # mid-run, well past compilation
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-6000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 100_000, (saved, output[-3000:])
    assert f"checkpoint saved at step {saved[0]}" in output
    assert (workdir / "config.json").is_file()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, cache_dir):
    """JAX's preemption notifier turns one process's SIGTERM into a sync point for all."""
    config_file = _write_config_file(tmp_path / "tiny.py", _LONG_RUN)
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [_main_process(config_file, tmp_path / "work", cache_dir,
                           f"--coordinator_address={coordinator}", "--num_processes=2",
                           f"--process_id={pid}") for pid in range(2)]
    lines = []
    _wait_for(procs[0], "step 3/", lines)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
    saved = [int(p.name) for p in (tmp_path / "work" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3, saved
    assert f"checkpoint saved at step {saved[0]}" in "".join(lines) + outputs[0]


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
