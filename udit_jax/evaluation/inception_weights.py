"""pytorch-fid's FID Inception weights -> Flax variables of `InceptionV3`.

The weight file is pytorch-fid's release `pt_inception-2015-12-05-6726825d.pth` (566 entries:
472 tensors + 94 `num_batches_tracked` counters, which inference does not use), or the same
state_dict saved as .npz / .safetensors. Nothing is downloaded at run time. To make a
torch-free copy once (on a machine with torch):

    python -m udit_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
        inception_fid.safetensors
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from udit_jax.convert.common import (CONV, LINEAR, SAME, KeySpec, check_state_dict, to_flax,
                                     torch_shape_of)
from udit_jax.convert.io import load_state_dict
from udit_jax.evaluation.inception import InceptionV3

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)
# BatchNorm batch counters: present in the released file, meaningless at inference.
UNUSED_SUFFIX = ".num_batches_tracked"

# Flax leaf name -> PyTorch leaf name.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}


def _abstract_variables(model: InceptionV3) -> dict:
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))


def inception_key_specs(model: InceptionV3 | None = None) -> list[KeySpec]:
    """One KeySpec per Flax variable (collection-prefixed path) <-> pytorch-fid key."""
    model = model or InceptionV3()
    flat = traverse_util.flatten_dict(_abstract_variables(model))
    specs = []
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        torch_key = ".".join(path[1:-1] + (_LEAF[path[-1]],))
        layout = SAME
        if path[-1] == "kernel":
            layout = CONV if len(shape) == 4 else LINEAR
        specs.append(KeySpec(torch_key, path, layout, shape, torch_shape_of(layout, shape)))
    return specs


def inception_variables_from_torch(state_dict: Mapping[str, np.ndarray],
                                   model: InceptionV3 | None = None) -> dict:
    """{'params': ..., 'batch_stats': ...} (float32) for `InceptionV3` from pytorch-fid's
    state_dict. Raises ConversionError listing every missing, unexpected or misshaped key."""
    specs = inception_key_specs(model)
    unused = [k for k in state_dict if k.endswith(UNUSED_SUFFIX)]
    check_state_dict(specs, state_dict, "pytorch-fid's FID InceptionV3 "
                     f"({WEIGHTS_NAME})", ignore=unused)
    flat = {s.flax_path: to_flax(np.asarray(state_dict[s.torch_key], np.float32), s)
            for s in specs}
    return traverse_util.unflatten_dict(flat)


def load_inception_variables(path: str | os.PathLike, model: InceptionV3 | None = None) -> dict:
    """Reads the FID Inception weights from `path` (.pth, .npz or .safetensors)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download pytorch-fid's {WEIGHTS_NAME} "
            f"from {WEIGHTS_URL} (or convert it to .safetensors/.npz with "
            "`python -m udit_jax.evaluation.convert_inception IN.pth OUT.safetensors`) and "
            "pass its path.")
    return inception_variables_from_torch(load_state_dict(path))
