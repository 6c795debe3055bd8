"""Exports: a trained or imported model as a self-contained directory for sampling jobs.

    python -m udit_jax.main --config=configs/demo.py --workdir=runs/demo --mode=export
    python -m udit_jax.export --import_weights=U-DiT-B-400k.pt --model=U-DiT-B --out=exports/udit_b
    model, params, info = export.load_export("runs/demo/export")

Layout of an export directory:

    export.json     what is needed to use the params, no training code involved:
                    model (registry family + constructor arguments, compute dtype),
                    diffusion (noise schedule, steps, learned variance), data (pixel or latent
                    space, image size, channels, classes, latent scale), vae (AutoencoderKL
                    arguments and the weights file it was trained with; null in pixel space),
                    metadata (training step, dataset, config hash, source)
    params/         the EMA params (training form, float32) as an orbax checkpoint; restored
                    against abstract targets, so any device count or host count reads it
    config.json     the training config, for reference (exports from training only)
    torch_state_dict.safetensors
                    optional: the official PyTorch state_dict (official key names and
                    layouts; U-DiT in the unfused training form the official code loads)

An export holds no optimizer state. Exports are written to a staging directory, read back,
and only then moved into place (the previous export is removed after the move), so a
directory that exists is complete and a failed export leaves the previous one as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from udit_jax import errors, parallel, paths

FORMAT_VERSION = 1
INFO_FILE = "export.json"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TORCH_WEIGHTS_FILE = "torch_state_dict.safetensors"
# Model fields that are runtime choices, not part of the trained model.
_RUNTIME_FIELDS = ("parent", "name", "dtype", "remat", "remat_keeps", "attention_impl", "fused_ffn")
_FAMILIES = {"DiT": "DiT", "UDiT": "U-DiT"}
# Config sections that do not change the trained weights (excluded from the config hash).
_POST_TRAINING_SECTIONS = ("export", "sample", "eval")


# ----------------------------------------------------------------------------------------
# Describing a model as JSON and back.

def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def model_description(model, name: str | None = None) -> dict[str, Any]:
    """{"name", "family", "kwargs", "dtype"}: enough to rebuild `model` with build_model."""
    family = _FAMILIES.get(type(model).__name__)
    if family is None:
        raise TypeError(f"cannot export a {type(model).__name__}; expected a DiT or U-DiT model")
    kwargs = {f.name: _jsonable(getattr(model, f.name)) for f in dataclasses.fields(model)
              if f.name not in _RUNTIME_FIELDS}
    return {"name": name or family, "family": family, "kwargs": kwargs,
            "dtype": np.dtype(model.dtype).name}


def model_from_description(description: Mapping[str, Any], dtype=None):
    """The training-form model an export describes (compute dtype `dtype` or the stored one)."""
    from udit_jax import models
    import jax.numpy as jnp
    return models.build_model(description["family"], **description["kwargs"],
                              dtype=jnp.dtype(dtype or description["dtype"]))


def config_hash(config) -> str:
    """sha256 of the training config (sections that do not change the weights left out)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in as_dict.items() if k not in _POST_TRAINING_SECTIONS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------
# Writing and reading export directories.

def _write_text(path: epath.Path, text: str) -> None:
    path.write_text(text)


def _replace_dir(staging: epath.Path, target: epath.Path) -> None:
    """Moves the verified `staging` to `target`; an old `target` is removed only afterwards."""
    old = target.parent / f".{target.name}.replaced"
    if old.exists():   # left by an interrupted replacement, whose new export is in place
        old.rmtree()
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        old.rmtree()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write_export(out_dir: str | os.PathLike, model, params, *, name: str | None = None,
                 diffusion: Mapping[str, Any], data: Mapping[str, Any],
                 vae: Mapping[str, Any] | None, metadata: Mapping[str, Any],
                 objective: Mapping[str, Any] | None = None,
                 config=None, torch_weights: bool = False) -> epath.Path:
    """Writes an export directory (replacing an existing one) and returns its path.

    model/params: the training-form model and its params (numpy or jax arrays, float32).
    diffusion: create_diffusion arguments {"noise_schedule", "diffusion_steps", "learn_sigma"}.
    data: {"space": "pixel"|"latent", "image_size", "channels", "num_classes", "latent_scale"}.
    vae: {"arguments": AutoencoderKL overrides, "weights": path} for latent models, else None.
    objective: config.objective_description (default DDPM's), so sampling picks its samplers.
    Every process calls it (the params are written collectively); process 0 writes the rest.
    """
    from udit_jax import convert
    import orbax.checkpoint as ocp
    out_dir = epath.Path(out_dir)
    if data["space"] not in ("pixel", "latent"):
        raise ValueError(f"data space {data['space']!r}; use 'pixel' or 'latent'")
    if data["space"] == "latent" and vae is None:
        raise ValueError("a latent-space export needs its VAE description (vae=...)")
    info = {
        "format_version": FORMAT_VERSION,
        "model": model_description(model, name),
        "diffusion": dict(diffusion),
        "objective": _jsonable(dict(objective or {"name": "ddpm"})),
        "data": dict(data),
        "vae": None if vae is None else _jsonable(dict(vae)),
        "metadata": dict(_jsonable(dict(metadata)),
                         created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                             timespec="seconds")),
    }
    if out_dir.exists() and not (out_dir / INFO_FILE).exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not an export directory; refusing to "
                              "replace it (choose another export directory)")
    staging = out_dir.parent / f".{out_dir.name}.staging"
    if jax.process_index() == 0:
        if staging.exists():
            staging.rmtree()
        staging.mkdir(parents=True)
    _barrier("export_staging")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(staging / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        if torch_weights:
            host = jax.tree.map(_host_array, params)
            convert.save_state_dict(staging / TORCH_WEIGHTS_FILE, convert.params_to_torch(model, host))
        if config is not None:
            _write_text(staging / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))
        _write_text(staging / INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        load_export(staging)   # the new export reads back before it replaces anything
        _replace_dir(staging, out_dir)
    _barrier("export_done")
    return out_dir


def _host_array(x) -> np.ndarray:
    # A replicated multi-host jax.Array is not fully addressable; any local copy is the value.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def read_info(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The export.json of an export directory, checked."""
    export_dir = epath.Path(export_dir)
    path = export_dir / INFO_FILE
    if not path.exists():
        hint = ""
        if (export_dir / "checkpoints").exists():
            hint = (" (this is a training workdir: run --mode=export on it first, or pass "
                    f"{export_dir / 'export'})")
        raise FileNotFoundError(f"{path} not found: {export_dir} is not an export directory{hint}. "
                                "Create one with --mode=export or `python -m udit_jax.export "
                                "--import_weights=...`")
    info = json.loads(path.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {info.get('format_version')!r}; this version "
                         f"of udit_jax reads format {FORMAT_VERSION}")
    return info


def load_export(export_dir: str | os.PathLike, *, mesh=None, dtype=None):
    """(model, params, info) from an export directory.

    model: the training-form DiT / U-DiT (compute dtype `dtype`, default the stored one).
    params: float32 jax arrays, replicated over `mesh` (default: on the first local device).
    info: the parsed export.json (model, diffusion, data, vae, metadata).
    """
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding
    from udit_jax import parallel
    from udit_jax.models.info import abstract_params
    import flax.linen as nn
    export_dir = epath.Path(export_dir)
    info = read_info(export_dir)
    model = model_from_description(info["model"], dtype)
    sharding = (parallel.replicated(mesh) if mesh is not None
                else SingleDeviceSharding(jax.local_devices()[0]))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          nn.unbox(abstract_params(model)))
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            params = checkpointer.restore(export_dir / PARAMS_DIR, target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{export_dir / PARAMS_DIR} does not hold params of the model "
                             f"described in {INFO_FILE} ({info['model']['name']}): {e}") from e
    return model, params, info


# ----------------------------------------------------------------------------------------
# --mode=export: EMA params of a training checkpoint.

def _restore_ema(workdir: epath.Path, step: int | None, config) -> tuple[int, Any]:
    """(step, EMA params as numpy) of the training checkpoints, without the optimizer state.

    step None: the newest checkpoint that restores. Raises IncompatibleCheckpointError when
    `config` differs from the one the checkpoint was written with. Moves nothing.
    """
    import flax.linen as nn
    from udit_jax import checkpoints
    from udit_jax import config as config_lib
    from udit_jax.models.info import abstract_params

    def target_of(c):
        # Without shardings they restore as host numpy arrays: any topology reads them.
        return {"ema_params": nn.unbox(abstract_params(config_lib.build_model(c))),
                "step": jax.ShapeDtypeStruct((), np.int32)}
    target = target_of(config)
    _, state = checkpoints.restore_params(
        workdir, target, config=config, step=step,
        relayouts=config_lib.block_relayouts(config, target_of))
    return int(state["step"]), state["ema_params"]


def _data_section(config) -> dict[str, Any]:
    from udit_jax import config as config_lib
    return {"space": "latent" if config_lib.is_latent(config) else "pixel",
            "image_size": int(config.data.image_size), "channels": int(config.data.channels),
            "num_classes": int(config.data.num_classes),
            "latent_scale": float(config.data.latent_scale)}


def _dataset_name(config) -> str:
    d = config.data
    if d.source == "tfds":
        return f"tfds:{d.tfds_name}/{d.split}"
    if d.source == "folder":
        return f"folder:{d.dir}"
    return f"{d.source}:{d.dir}" if d.dir else d.source


def export_from_config(config, workdir: str) -> str:
    """`--mode=export`: the EMA params of a training run's checkpoint as an export directory.

    Fields read: export.dir ("" = <workdir>/export), export.step (0 = latest),
    export.torch_weights; model / diffusion / data / vae describe what was trained.
    Returns the export directory.
    """
    from udit_jax import config as config_lib
    workdir = epath.Path(workdir)
    settings = config.export
    model = config_lib.build_model(config)
    out_dir = epath.Path(settings.dir) if settings.dir else workdir / "export"
    # Before the checkpoint is read: an export.dir that cannot be written fails at once.
    paths.check_output_dir(str(out_dir), "export.dir", own_entries={INFO_FILE})
    step, ema = _restore_ema(workdir, settings.step or None, config)
    data = _data_section(config)
    vae = None
    if data["space"] == "latent":
        vae = {"arguments": dict(config.vae.arguments), "weights": str(config.vae.weights)}
    metadata = {"source": "training", "step": step, "dataset": _dataset_name(config),
                "config_hash": config_hash(config), "workdir": str(workdir),
                "model_name": config.model.name}
    write_export(out_dir, model, ema, name=config.model.name,
                 diffusion=config_lib.diffusion_arguments(config),
                 data=data, vae=vae, metadata=metadata,
                 objective=config_lib.objective_description(config), config=config,
                 torch_weights=bool(settings.torch_weights))
    if jax.process_index() == 0:
        from absl import logging
        logging.info("exported the EMA params of step %d to %s", step, out_dir)
    return str(out_dir)


# ----------------------------------------------------------------------------------------
# Import of official checkpoints.

_DIT_FILE = re.compile(r"DiT-(S|B|L|XL)-(2|4|8)-(\d+)x\d+")
_UDIT_FILE = re.compile(r"U-DiT-(S|B|L)(?:-(\d+)k)?")


def guess_model(path: str | os.PathLike) -> tuple[str, int, int | None] | None:
    """(model name, image size, training step or None) from an official file name, else None.

    DiT-XL-2-256x256.pt -> ("DiT-XL/2", 256, None); U-DiT-B-400k.pt -> ("U-DiT-B", 256, 400000).
    """
    name = os.path.basename(os.fspath(path))
    m = _DIT_FILE.search(name)
    if m and not name.startswith("U-"):
        return f"DiT-{m.group(1)}/{m.group(2)}", int(m.group(3)), None
    m = _UDIT_FILE.search(name)
    if m:
        return f"U-DiT-{m.group(1)}", 256, int(m.group(2)) * 1000 if m.group(2) else None
    return None


def import_state_dict(state_dict: Mapping[str, np.ndarray], model_name: str,
                      out_dir: str | os.PathLike, *, image_size: int = 256,
                      space: str = "latent", channels: int = 3, num_classes: int = 1000,
                      metadata: Mapping[str, Any] | None = None, torch_weights: bool = False,
                      vae_weights: str = "", diffusion: Mapping[str, Any] | None = None,
                      objective: Mapping[str, Any] | None = None, latent_scale: float = 0.18215,
                      vae_arguments: Mapping[str, Any] | None = None,
                      **model_overrides) -> epath.Path:
    """Writes an export directory from an official state_dict (official key names).

    The model is `model_name` (registry name or family) built for `image_size` (latent
    models see image_size // 8) and `num_classes`, plus `model_overrides` (official
    argument names). A state_dict for another model raises ConversionError listing the
    missing, unexpected and wrongly shaped keys before any parameter is allocated.
    diffusion / objective / latent_scale / vae_arguments: as an export records them (an
    export's round trip keeps its own); by default the official linear 1000-step schedule
    (learned variance as the model has it), DDPM's objective, SD's latent scale and VAE.
    """
    from udit_jax import convert, models
    if space not in ("latent", "pixel"):
        raise ValueError(f"space={space!r}; use 'latent' (SD-VAE latents) or 'pixel'")
    latent = space == "latent"
    if latent and image_size % 8:
        raise ValueError(f"image_size={image_size} is not a multiple of 8 (the VAE's factor)")
    kwargs = dict(input_size=image_size // 8 if latent else image_size,
                  in_channels=4 if latent else channels, num_classes=num_classes)
    clash = {k: v for k, v in model_overrides.items() if k in kwargs and v != kwargs[k]}
    if clash:
        raise ValueError(f"model arguments {clash} disagree with image_size={image_size}, "
                         f"space={space!r}, channels={channels}, num_classes={num_classes} "
                         f"(which give {kwargs}); drop them or change those settings")
    kwargs.update(model_overrides)
    model = models.build_model(model_name, **kwargs)
    params = convert.params_from_torch(model, state_dict)   # checks every key first
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    data = {"space": space, "image_size": int(image_size),
            "channels": 3 if latent else int(channels), "num_classes": int(num_classes),
            "latent_scale": float(latent_scale)}
    vae = {"arguments": dict(vae_arguments or {}), "weights": vae_weights} if latent else None
    diffusion = dict(diffusion or {"noise_schedule": "linear", "diffusion_steps": 1000})
    if bool(diffusion.setdefault("learn_sigma", bool(model.learn_sigma))) != bool(model.learn_sigma):
        raise ValueError(f"the diffusion has learn_sigma={diffusion['learn_sigma']} but the model "
                         f"{model_name} has learn_sigma={model.learn_sigma}")
    description = model_description(model, model_name)
    meta = {"source": "import", "step": None, "dataset": "imagenet2012" if latent else None,
            "config_hash": "sha256:" + hashlib.sha256(json.dumps(
                [description, data], sort_keys=True).encode()).hexdigest()}
    meta.update(metadata or {})
    return write_export(out_dir, model, params, name=model_name, diffusion=diffusion,
                        objective=objective, data=data, vae=vae, metadata=meta,
                        torch_weights=torch_weights)


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def import_official(path: str | os.PathLike, model_name: str | None, out_dir: str | os.PathLike,
                    *, image_size: int | None = None, **kwargs) -> epath.Path:
    """An export directory from an official checkpoint file.

    path: .pt / .pth (needs torch; read with weights_only=True, so a pickle that would run
      code is refused), .safetensors or .npz; a raw state_dict or {"ema": ...}.
    model_name: e.g. "DiT-XL/2", "U-DiT-B"; None infers it (and the image size and step)
      from official file names such as DiT-XL-2-512x512.pt or U-DiT-L-1000k.pt.
    kwargs: as import_state_dict (num_classes, space, torch_weights, vae_weights, model
      overrides).
    """
    from udit_jax import convert
    guessed = guess_model(path)
    if model_name is None:
        if guessed is None:
            raise ValueError(f"cannot tell the model from the file name {os.path.basename(path)!r}; "
                             "name it (--model=U-DiT-B, DiT-XL/2, ...)")
        model_name = guessed[0]
    if image_size is None:
        image_size = guessed[1] if guessed and guessed[0] == model_name else 256
    state_dict = convert.load_state_dict(path)
    metadata = {"weights_file": os.path.basename(os.fspath(path)),
                "weights_sha256": _file_sha256(path),
                "step": guessed[2] if guessed and guessed[0] == model_name else None}
    metadata.update(kwargs.pop("metadata", None) or {})
    return import_state_dict(state_dict, model_name, out_dir, image_size=image_size,
                             metadata=metadata, **kwargs)


def description_from_export(export_dir: str | os.PathLike) -> dict[str, Any]:
    """import_official's keyword arguments that rebuild the export an export.json describes:
    {model_name, image_size, space, channels, num_classes, vae_weights, vae_arguments,
    latent_scale, diffusion, objective, **model arguments}."""
    info = read_info(export_dir)
    data, model = info["data"], info["model"]
    kwargs = {k: v for k, v in model["kwargs"].items()
              if k not in ("input_size", "in_channels", "num_classes")}
    vae = info.get("vae") or {}
    return dict(kwargs, model_name=model["family"], image_size=data["image_size"],
                space=data["space"], channels=data["channels"], num_classes=data["num_classes"],
                vae_weights=vae.get("weights") or "", vae_arguments=vae.get("arguments") or {},
                latent_scale=data.get("latent_scale", 0.18215), diffusion=info["diffusion"],
                objective=info.get("objective") or {"name": "ddpm"})


def main(argv: list[str] | None = None) -> int:
    """`python -m udit_jax.export --import_weights=PATH [--model=NAME] --out=DIR`, or
    `--from_export=DIR --out=DIR2` (the round trip of an export's official weights)."""
    parser = argparse.ArgumentParser(
        prog="python -m udit_jax.export",
        description="Import an official DiT / U-DiT checkpoint as an export directory "
                    "(exports of training runs: python -m udit_jax.main --mode=export).")
    parser.add_argument("--import_weights", default=None,
                        help="checkpoint file: .pt/.pth (needs torch), .safetensors or .npz "
                             f"(default with --from_export: its {TORCH_WEIGHTS_FILE})")
    parser.add_argument("--from_export", default=None,
                        help="take the model description (model, image size, space, channels, "
                             "classes, VAE) from this export directory's export.json")
    parser.add_argument("--model", default=None,
                        help="model name (DiT-XL/2, U-DiT-B, ...); default: from the file name")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--image_size", type=int, default=None,
                        help="image size in pixels (default: from the file name, else 256)")
    parser.add_argument("--num_classes", type=int, default=None, help="default 1000")
    parser.add_argument("--space", choices=("latent", "pixel"), default=None,
                        help="default latent")
    parser.add_argument("--channels", type=int, default=None,
                        help="image channels (pixel space; default 3)")
    parser.add_argument("--vae_weights", default="",
                        help="SD VAE weights file to record for sampling (latent models)")
    parser.add_argument("--torch_weights", action="store_true",
                        help="also write torch_state_dict.safetensors")
    parser.add_argument("--model_kwargs", default="{}",
                        help='JSON of constructor overrides, e.g. \'{"learn_sigma": false}\'')
    args = parser.parse_args(argv)
    parallel.skip_tpu_backend_without_tpu()   # no page of libtpu errors on a CPU/GPU host
    try:
        overrides = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        parser.error(f"--model_kwargs is not valid JSON ({e})")
    if not isinstance(overrides, dict):
        parser.error(f"--model_kwargs must be a JSON object, got {args.model_kwargs!r}")
    # num_classes may come from the flag or from --model_kwargs (as in an export.json).
    num_classes = overrides.pop("num_classes", args.num_classes)
    if args.num_classes is not None and num_classes != args.num_classes:
        parser.error(f"--num_classes={args.num_classes} but --model_kwargs has "
                     f"num_classes={num_classes}")
    out_dir = paths.resolve(args.out)
    try:
        paths.check_output_dir(out_dir, "--out", own_entries={INFO_FILE})
    except ValueError as e:
        parser.error(str(e))
    given = dict(image_size=args.image_size, space=args.space, channels=args.channels,
                 num_classes=num_classes)
    settings = dict(image_size=args.image_size, space=args.space or "latent",
                    channels=args.channels or 3,
                    num_classes=1000 if num_classes is None else num_classes,
                    vae_weights="", model_name=args.model)
    weights = paths.resolve(args.import_weights) if args.import_weights else None
    try:
        if args.from_export:
            from_export = paths.resolve(args.from_export)
            described = description_from_export(from_export)
            clash = [f"--{k}={v} (the export has {described[k]})" for k, v in given.items()
                     if v is not None and v != described[k]]
            if clash:
                raise ValueError(f"{', '.join(clash)}: --from_export rebuilds the exported "
                                 "model; drop the flag")
            settings.update(described)
            if not weights:
                weights = os.path.join(from_export, TORCH_WEIGHTS_FILE)
                if not os.path.exists(weights):
                    raise FileNotFoundError(
                        f"{from_export} has no {TORCH_WEIGHTS_FILE}: export it again with "
                        "--config.export.torch_weights=True, or give --import_weights=FILE")
        if not weights:
            parser.error("give --import_weights=FILE (or --from_export=DIR)")
        if args.vae_weights:   # an explicit flag wins over an export's record
            settings["vae_weights"] = paths.resolve(args.vae_weights)
        settings.update(overrides)   # --model_kwargs wins over an export's description
        out = import_official(weights, settings.pop("model_name"), out_dir,
                              torch_weights=args.torch_weights, **settings)
    except errors.EXPECTED as e:
        errors.report(e)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
