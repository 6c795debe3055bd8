"""The documented commands, run exactly as written (README.md and every configs/*.py docstring).

Every shell command in a ```bash / ```sh / ```shell block of README.md and every `python ...`
line of a config's docstring is run from a scratch folder laid out like the repository root
(`configs/` linked in, the package on PYTHONPATH), with its own relative paths and flags,
followed only by the size-reducing overrides its RECIPES entry appends (fewer steps and
images, a tiny model, small data). Only `python` becomes this interpreter. Around that:

* Placeholders for the user's own storage (PLACEHOLDERS: `gs://BUCKET/...`, `/path/to/...`)
  become relative local folders: no bucket exists here (gs:// paths themselves are covered by
  test_paths.py).
* Files the commands name that cannot exist here (released checkpoints, the SD-VAE, the
  Inception weights, ImageNet, Fashion-MNIST) are written first as small files in the same
  format: a tiny DiT / U-DiT state_dict under the official file name, a 4-block VAE with 8
  channels, a few JPEGs in class folders, Fashion-MNIST idx files.
* Install steps (`pip install`, `apt-get`, the `[ -d ... ]` test in the first command) are
  not run: the tests run in the installed package. The rest of such a line is run.
* A README line saying `# not run by tests: <why>` is not run (the test suite itself).
* `.pt`/`.pth` files need PyTorch (`pip install 'udit-jax[torch]'`, as the README says); without
  it those commands are run and must stop with that instruction.

A command with no recipe, or a recipe matching no command, fails the test: when the README
or a docstring changes, this table changes with it.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH = importlib.util.find_spec("torch") is not None
NOT_RUN = re.compile(r"#\s*not run by tests:\s*(\S.*)$")
INSTALL_STEPS = ("pip", "apt-get", "[", "{", "}")   # first words of segments that set up, not run
PLACEHOLDERS = {"gs://BUCKET/": "bucket/", "/path/to/": ""}
TORCH_HINT = "pip install 'udit-jax[torch]'"

# ----------------------------------------------------------------------------------------
# Size-reducing overrides.

SHORT_TRAIN = ["--config.total_steps=2", "--config.checkpoint_every_steps=2",
               "--config.log_every_steps=1", "--config.sample_every_steps=0",
               "--config.batch_size=4"]
# The ImageNet configs at 64x64 pixels (8x8x4 latents) with a 2-block DiT.
TINY_LATENT = ["--config.data.image_size=64", "--config.model.name=DiT",
               '--config.model.kwargs={"patch_size": 2, "hidden_size": 32, "depth": 2, '
               '"num_heads": 2}']
SMALL_VAE_ARGS = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}
SMALL_VAE = ["--config.vae.arguments=" + repr(SMALL_VAE_ARGS)]   # a Python literal, as typed
TINY_UDIT_KWARGS = {"hidden_size": 16, "depth": [0, 1, 1, 1, 0], "num_heads": 1}
TINY_DIT_KWARGS = {"hidden_size": 32, "depth": 2, "num_heads": 2}
FASHION = ("--config.data.dir=fashion-mnist",)   # the small idx files the test writes
CLASS_FOLDERS = ("--config.data.num_classes=2",)  # the two class folders the test writes
DEMO_SMALL = ("--config.sample.per_class=1", "--config.sample.steps=2")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one documented command is run here.

    pattern: regex searched in the command (placeholders substituted).
    overrides: arguments appended (argparse and absl: the last value of a flag wins).
    creates: paths (relative to the scratch root) the command must have written.
    needs: commands (other recipes' patterns) that must have run first, e.g. the training a
      sampling job reads. torch: reads a .pt/.pth file. slow: only with -m slow (when run).
    """
    pattern: str
    overrides: tuple = ()
    creates: tuple = ()
    needs: tuple = ()
    torch: bool = False
    slow: bool = False
    before: Callable[[pathlib.Path], None] | None = None   # writes files it alone needs


RECIPES = [
    # The demo: run to its first checkpoint (test_demo_... resumes it).
    Recipe(r"main --config=configs/demo\.py --workdir=runs/demo$",
           (*FASHION, "--config.total_steps=5", "--config.checkpoint_every_steps=5",
            "--config.sample_every_steps=5", "--config.log_every_steps=1", *DEMO_SMALL),
           creates=("runs/demo/checkpoints/5", "runs/demo/samples/step_00000005.png")),
    Recipe(r"configs/demo\.py --workdir=runs/demo --mode=export$", (),
           creates=("runs/demo/export/export.json",), needs=("runs/demo$",)),
    Recipe(r"configs/demo\.py --workdir=runs/demo --mode=sample$", DEMO_SMALL,
           creates=("runs/demo/samples/dpm-2-cfg5-seed0-grid10x1/grid.png",),
           needs=("runs/demo --mode=export$",)),
    # The ImageNet configs' docstrings: encode a few JPEGs with a small VAE, train on them.
    Recipe(r"--config=configs/(\w+)\.py --workdir=bucket/\1 --mode=encode "
           r"--config\.data\.cache_dir=bucket/imagenet(256|512)_latents "
           r"--config\.vae\.weights=sd-vae-ft-ema/diffusion_pytorch_model\.safetensors$",
           ("--config.data.source=folder", "--config.data.dir=imagenet/train",
            "--config.data.encode_batch_size=4", "--config.data.image_size=64", *SMALL_VAE,
            *CLASS_FOLDERS)),
    Recipe(r"--config=configs/(\w+)\.py --workdir=bucket/\1 "
           r"--config\.data\.cache_dir=bucket/imagenet(256|512)_latents$",
           # bucket/udit_l also holds the README's synthetic run: start fresh beside it.
           (*TINY_LATENT, *SHORT_TRAIN, *SMALL_VAE, *CLASS_FOLDERS,
            "--config.checkpoint.on_mismatch=start_fresh")),
    # README: training, exports and sampling jobs.
    Recipe(r"--config=configs/udit_l\.py --workdir=bucket/udit_l --config\.batch_size=512$",
           (*TINY_LATENT, *SHORT_TRAIN, "--config.data.source=synthetic"),
           creates=("bucket/udit_l/checkpoints/2",)),
    Recipe(r"--config=configs/udit_b\.py --workdir=bucket/udit_b --mode=export$",
           (*TINY_LATENT, *SMALL_VAE, *CLASS_FOLDERS),
           creates=("bucket/udit_b/export/export.json",),
           needs=("configs/udit_b.py --workdir=bucket/udit_b --config.data.cache_dir",)),
    Recipe(r"--config=configs/udit_b\.py --workdir=bucket/udit_b --mode=sample "
           r"--config\.sample\.num_images=50000 --config\.sample\.cfg_scale=1\.5 "
           r"--config\.vae\.weights=sd-vae-ft-ema/diffusion_pytorch_model\.safetensors$",
           ("--config.sample.num_images=2", "--config.sample.steps=2",
            "--config.sample.per_device_batch=2"),
           creates=("bucket/udit_b/samples/ddpm-2-cfg1.5-seed0-2/samples.npz",),
           needs=("udit_b --mode=export$",)),
    Recipe(r"^python -m udit_jax\.export --import_weights=DiT-XL-2-256x256\.pt "
           r"--out=exports/dit_xl_2$", ("--model_kwargs=" + json.dumps(TINY_DIT_KWARGS),),
           creates=("exports/dit_xl_2/export.json",), torch=True),
    Recipe(r"^python -m udit_jax\.export --import_weights=U-DiT-B-400k\.pt --model=U-DiT-B "
           r"--out=exports/udit_b$", ("--model_kwargs=" + json.dumps(TINY_UDIT_KWARGS),),
           creates=("exports/udit_b/export.json",), torch=True),
    # The round trip: the demo's export with its official weights, imported back.
    Recipe(r"^python -m udit_jax\.export --from_export=runs/demo/export "
           r"--out=exports/demo_reimported$", (),
           creates=("exports/demo_reimported/export.json",), needs=("runs/demo --mode=export$",),
           before=lambda root: _export_demo_torch_weights(root)),   # defined below
    # The full-size SD VAE decodes (the import records the official VAE): slow.
    Recipe(r"--config=configs/udit_b\.py --workdir=runs/udit_b_official --mode=sample "
           r"--config\.sample\.export_dir=exports/udit_b "
           r"--config\.vae\.weights=sd-vae-ft-ema\.safetensors$",
           ("--config.sample.num_images=1", "--config.sample.steps=2",
            "--config.sample.per_device_batch=1"),
           creates=("runs/udit_b_official/samples/ddpm-2-cfg4-seed0-1/samples.npz",),
           needs=("exports/udit_b$",), slow=True,
           before=lambda root: _write_sd_vae(root)),   # defined below
    # The full-size Inception network: slow.
    Recipe(r"--mode=evaluate --config=configs/udit_b\.py --workdir=runs/eval "
           r"--config\.eval\.sample_npz=samples\.npz "
           r"--config\.eval\.reference_npz=VIRTUAL_imagenet256_labeled\.npz "
           r"--config\.eval\.inception_weights=pt_inception-2015-12-05-6726825d\.pth$",
           ("--config.eval.batch_size=4", "--config.eval.is_split_size=4",
            "--config.eval.fid_method=eigh"),
           creates=("runs/eval/eval/samples.json",), torch=True, slow=True),
    # Benchmarks: one iteration of small shapes. Those of named models compile a full-depth
    # network (no tiny override exists for them): slow.
    Recipe(r"benchmarks\.bench_model --model U-DiT-B --batch 64 --dtype bfloat16$",
           ("--model", "DiT-S/8", "--batch", "1", "--input_size", "8", "--iters", "1",
            "--skip_train"), slow=True),
    Recipe(r"benchmarks\.bench_sampler --model U-DiT-B --batch 32 --samplers ddpm250,ddim50,dpm20$",
           ("--model", "DiT-S/8", "--batch", "1", "--image-size", "64", "--samplers",
            "ddpm2,ddim2,dpm2", "--iters", "1"), slow=True),
    Recipe(r"benchmarks\.bench_sampler --model U-DiT-B --batch 32 --samplers "
           r"ode-heun2_26,sde-Euler250,ode-dopri5_50$",
           ("--model", "DiT-S/8", "--batch", "1", "--image-size", "64", "--samplers",
            "ode-heun2_3,sde-Euler3,ode-dopri5_3", "--iters", "1"), slow=True),
    Recipe(r"benchmarks\.bench_compile_parts$",
           ("--width", "32", "--side", "8", "--heads", "2", "--batch", "2", "--parts",
            "ffn_rep", "dwconv5_grouped")),
    Recipe(r"benchmarks\.bench_vae --batch 32$",
           ("--batch", "1", "--size", "64", "--dtypes", "float32", "--iters", "1"), slow=True),
    Recipe(r"benchmarks\.bench_data$",
           ("--records", "64", "--latent", "4", "--batch", "8", "--threads", "1",
            "--seconds", "0.2", "--encode-images", "2", "--encode-size", "32",
            "--encode-batch", "2", "--vae", "small")),
    Recipe(r"benchmarks\.bench_train --config[= ]configs/udit_b\.py$",
           ("--per_device_batch=2", "--steps=1", "--warmup=1", "--config.data.image_size=64",
            "--config.model.name=DiT",
            "--config.model.kwargs=" + json.dumps(TINY_DIT_KWARGS | {"patch_size": 2}))),
    Recipe(r"benchmarks\.bench_inception$", ("--batch", "1", "--size", "75", "--iters", "1"),
           slow=True),
]


# ----------------------------------------------------------------------------------------
# Extraction.

def _join_continuations(text: str) -> list[str]:
    return re.sub(r"\s*\\\n\s*", " ", text).splitlines()


def readme_lines() -> list[str]:
    """The command lines of README.md's shell blocks (continuations joined)."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        lines += [ln.strip() for ln in _join_continuations(block)
                  if ln.strip() and not ln.strip().startswith("#")]
    return lines


def docstring_lines(path: pathlib.Path) -> list[str]:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [ln.strip() for ln in _join_continuations(doc) if ln.strip().startswith("python ")]


def substitute(line: str) -> str:
    for placeholder, local in PLACEHOLDERS.items():
        line = line.replace(placeholder, local)
    return line


def split_line(line: str) -> tuple[list[list[str]], list[str]]:
    """(python commands as argv lists, skipped install segments) of one shell line."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "&", "|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    commands, skipped = [], []
    for segment in filter(None, segments):
        if segment[0] == "python":
            commands.append(segment)
        elif segment[0] in INSTALL_STEPS:
            skipped.append(" ".join(segment))
        else:
            raise AssertionError(f"{line!r}: segment {shlex.join(segment)!r} is neither a python "
                                 "command nor an install step; teach test_readme_commands.py")
    return commands, skipped


@dataclasses.dataclass
class Command:
    source: str          # "README.md" or "configs/x.py"
    argv: list[str]      # as written (placeholders substituted)

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    def recipe(self) -> Recipe:
        found = [r for r in RECIPES if re.search(r.pattern, self.text)]
        assert found, (f"{self.source}: no recipe for {self.text!r}: add one to RECIPES in "
                       "tests/test_readme_commands.py, or mark the line '# not run by tests: why'")
        assert len(found) == 1, f"{self.text!r} matches several recipes: {found}"
        return found[0]


def collect() -> tuple[list[Command], list[str], list[str]]:
    """(commands in document order: README, then configs/*.py; skipped install segments;
    lines marked not to run)."""
    commands, skipped, marked = [], [], []
    sources = [("README.md", readme_lines())] + [
        (f"configs/{p.name}", docstring_lines(p)) for p in sorted((REPO / "configs").glob("*.py"))]
    for source, lines in sources:
        for line in lines:
            if NOT_RUN.search(line):
                marked.append(line)
                continue
            argvs, skips = split_line(substitute(line))
            skipped += skips
            commands += [Command(source, argv) for argv in argvs]
    return commands, skipped, marked


COMMANDS, SKIPPED, MARKED = collect()


# ----------------------------------------------------------------------------------------
# The scratch root and the small files in the commands' formats.

def _write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(folder: pathlib.Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x801)


def _write_class_folders(root: pathlib.Path) -> None:
    from PIL import Image
    rng = np.random.default_rng(1)
    for cls in ("n01440764", "n01443537"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (72, 80, 3), np.uint8)).save(
                root / cls / f"{cls}_{i}.JPEG")


def _random_like(abstract) -> dict:
    # Small random values of the right shapes: no initialisation program to compile.
    import jax
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                        abstract)


def _write_sd_vae(root: pathlib.Path) -> None:
    """Random weights of the full-size SD VAE (what an import records), 335 MB."""
    import jax
    from udit_jax import convert, models
    vae = models.build_vae()
    abstract = jax.eval_shape(vae.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    convert.save_state_dict(root / "sd-vae-ft-ema.safetensors",
                            convert.vae_params_to_torch(vae, _random_like(abstract["params"])))


def _export_demo_torch_weights(root: pathlib.Path) -> None:
    """The demo's export again, with its official weights (--config.export.torch_weights)."""
    result = run(root, ["python", "-m", "udit_jax.main", "--config=configs/demo.py",
                        "--workdir=runs/demo", "--mode=export", "--config.export.torch_weights=True"])
    assert result.returncode == 0, result.stdout[-8000:]
    assert (root / "runs/demo/export/torch_state_dict.safetensors").exists()


def _write_small_vae(path: pathlib.Path) -> None:
    import jax
    from udit_jax import convert, models
    vae = models.build_vae(**SMALL_VAE_ARGS)
    abstract = jax.eval_shape(vae.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    convert.save_state_dict(path, convert.vae_params_to_torch(vae, _random_like(abstract["params"])))


def _official_state_dict(name: str, **kwargs) -> dict:
    import flax.linen as nn
    from udit_jax import convert, models
    from udit_jax.models.info import abstract_params
    model = models.build_model(name, input_size=32, in_channels=4, **kwargs)
    return convert.params_to_torch(model, _random_like(nn.unbox(abstract_params(model))))


def _write_checkpoint(path: pathlib.Path, state_dict: dict) -> None:
    """`path` as the official code ships it (torch.save). Without torch only a stand-in file:
    the command must then stop at reading it, asking for PyTorch."""
    if not TORCH:
        path.write_bytes(b"written without torch")
        return
    import torch
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)


def _write_evaluation_inputs(root: pathlib.Path) -> None:
    """ADM-layout sample and reference batches; pytorch-fid's .pth (from the fixture's weights)."""
    from conftest import FIXTURES
    rng = np.random.default_rng(2)
    np.savez(root / "samples.npz", arr_0=rng.integers(0, 256, (4, 64, 64, 3), np.uint8),
             arr_1=np.arange(4))
    np.savez(root / "VIRTUAL_imagenet256_labeled.npz",
             arr_0=rng.integers(0, 256, (4, 64, 64, 3), np.uint8))
    with np.load(FIXTURES / "eval" / "inception_fid_weights.npz") as weights:
        _write_checkpoint(root / "pt_inception-2015-12-05-6726825d.pth",
                          {k: weights[k] for k in weights.files})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("repo_root")
    (root / "configs").symlink_to(REPO / "configs")
    _write_fashion_mnist(root / "fashion-mnist")
    _write_class_folders(root / "imagenet" / "train")
    _write_small_vae(root / "sd-vae-ft-ema" / "diffusion_pytorch_model.safetensors")
    _write_checkpoint(root / "DiT-XL-2-256x256.pt",
                      _official_state_dict("DiT-XL/2", num_classes=1000, **TINY_DIT_KWARGS))
    _write_checkpoint(root / "U-DiT-B-400k.pt",
                      _official_state_dict("U-DiT-B", num_classes=1000, **TINY_UDIT_KWARGS))
    _write_evaluation_inputs(root)
    return root


_RESULTS: dict[str, subprocess.CompletedProcess] = {}


def run(root: pathlib.Path, argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs argv (`python` = this interpreter) in `root`; memoised by the full command."""
    key = shlex.join(argv)
    if key not in _RESULTS:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        start = time.time()
        _RESULTS[key] = subprocess.run([sys.executable, *argv[1:]], cwd=root, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       timeout=timeout)
        print(f"{time.time() - start:6.1f} s  {key}")
    return _RESULTS[key]


def run_documented(root: pathlib.Path, command: Command) -> subprocess.CompletedProcess:
    """Runs a documented command with its recipe (and what it needs first); checks it."""
    recipe = command.recipe()
    if command.source != "README.md":   # a docstring's commands are steps, in order
        for earlier in COMMANDS[:COMMANDS.index(command)]:
            if earlier.source == command.source:
                run_documented(root, earlier)
    for needed in recipe.needs:
        matches = [c for c in COMMANDS if needed in c.text or re.search(needed, c.text)]
        assert matches, f"{recipe.pattern}: needs {needed!r}, which no documented command is"
        run_documented(root, matches[0])
        if matches[0].recipe().torch and not TORCH:
            pytest.skip(f"needs {matches[0].text!r}, which reads a .pt file: needs PyTorch")
    if recipe.before is not None:
        recipe.before(root)
    result = run(root, command.argv + list(recipe.overrides))
    output = result.stdout[-8000:]
    if recipe.torch and not TORCH:
        assert result.returncode != 0 and TORCH_HINT in result.stdout, output
        return result
    assert result.returncode == 0, f"{command.text}\n{output}"
    for path in recipe.creates:
        assert (root / path).exists(), f"{command.text} did not write {path}\n{output}"
    return result


def _runs_slowly(command: Command) -> bool:
    recipes = [r for r in RECIPES if re.search(r.pattern, command.text)]   # none: the test fails
    return any(r.slow and (TORCH or not r.torch) for r in recipes)


def _params(commands):
    return [pytest.param(c, id=c.text[:90], marks=[pytest.mark.slow] if _runs_slowly(c) else [])
            for c in commands]


# ----------------------------------------------------------------------------------------
# Tests.

def test_every_command_has_exactly_one_recipe_and_every_recipe_a_command():
    assert COMMANDS, "no commands found in README.md"
    for command in COMMANDS:
        command.recipe()
    for recipe in RECIPES:
        assert any(re.search(recipe.pattern, c.text) for c in COMMANDS), (
            f"recipe {recipe.pattern!r} matches no documented command: delete or update it")
    # What is not run, and why: install steps and lines marked in the README.
    assert all(s.split()[0] in INSTALL_STEPS for s in SKIPPED)
    assert any(s.startswith("pip install -e") for s in SKIPPED)   # the first command's install
    assert any("pytest" in m for m in MARKED)


def test_extraction_follows_shell_syntax():
    line = ('[ -d /x ] || { apt-get update && apt-get install -y p; }; pip install -e ".[test]" '
            '&& python -m udit_jax.main --config=a.py --workdir="runs/my demo"  # trailing')
    commands, skipped = split_line(line)
    assert commands == [["python", "-m", "udit_jax.main", "--config=a.py",
                         "--workdir=runs/my demo"]]
    assert skipped == ["[ -d /x ]", "{ apt-get update", "apt-get install -y p", "}",
                       'pip install -e .[test]']
    with pytest.raises(AssertionError, match="neither a python command nor an install step"):
        split_line("rm -rf runs")
    assert _join_continuations("python a \\\n    --b=1\nnext") == ["python a --b=1", "next"]


@pytest.mark.parametrize("command", _params([c for c in COMMANDS if c.source == "README.md"]))
def test_readme_command(scratch, command):
    run_documented(scratch, command)


@pytest.mark.parametrize("command", _params([c for c in COMMANDS if c.source != "README.md"]))
def test_config_docstring_command(scratch, command):
    run_documented(scratch, command)


def test_demo_command_checkpoints_and_resumes_with_a_relative_workdir(scratch):
    """The README's first command: to its first checkpoint (step 5), then the same command
    again continues from it."""
    demo = next(c for c in COMMANDS if re.search(RECIPES[0].pattern, c.text))
    first = run_documented(scratch, demo)
    assert "no checkpoint in " + str(scratch / "runs" / "demo" / "checkpoints") in first.stdout
    resumed = run(scratch, demo.argv + list(RECIPES[0].overrides) + ["--config.total_steps=7"])
    assert resumed.returncode == 0, resumed.stdout[-8000:]
    assert "restored the checkpoint at step 5" in resumed.stdout, resumed.stdout[-4000:]
    assert (scratch / "runs" / "demo" / "checkpoints" / "7").is_dir()
    config = json.loads((scratch / "runs" / "demo" / "config.json").read_text())
    assert config["data"]["dir"] == str(scratch / "fashion-mnist")   # resolved once, absolute
