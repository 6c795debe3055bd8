"""Reading and writing state_dict files: .npz, .safetensors, and (with torch) .pt/.pth/.bin."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
from typing import Mapping

import numpy as np

# Wrappers the official scripts put around a state_dict: DiT/U-DiT training checkpoints hold
# {"model", "ema", "opt", "args"}; released files hold the EMA weights, raw or as {"ema": ...}.
_WRAPPER_KEYS = ("ema", "state_dict", "model")


def _unwrap(obj, prefer: str = "ema"):
    if isinstance(obj, Mapping) and not all(hasattr(v, "shape") for v in obj.values()):
        for key in (prefer,) + tuple(k for k in _WRAPPER_KEYS if k != prefer):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        raise ValueError(f"checkpoint holds no state_dict: top-level keys are {sorted(obj)[:10]}; "
                         f"expected tensors or one of {_WRAPPER_KEYS}")
    return obj


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def load_state_dict(path: str | os.PathLike, prefer: str = "ema") -> dict[str, np.ndarray]:
    """Loads a state_dict as {official key: numpy array}.

    .npz and .safetensors need no torch. .pt/.pth/.bin/.ckpt use torch.load with
    weights_only=True, so a pickle that would run code is refused, never executed.
    Checkpoints wrapped as {"ema": ...}, {"model": ...} or {"state_dict": ...} are unwrapped
    (`prefer` picks which first).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}. Give the path of a downloaded "
                                "checkpoint (.pt, .safetensors or .npz).")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ValueError(f"weights file {path} is empty (0 bytes): an interrupted download? "
                         "Download it again")
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path.name} needs PyTorch: pip install 'udit-jax[torch]', "
                              "or convert the file to .safetensors/.npz elsewhere") from e
        try:
            # The official train.py saves its argparse.Namespace beside the weights ("args"):
            # plain data, allowed; any other object is refused, never constructed.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError (or others) for unsafe pickles
            # torch's text is a page of advice; its "Unsupported global: X" line is the cause.
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            cause = (f"it holds a {found.group(1)} object" if found
                     else re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0])
            raise ValueError(f"refused to load {path}: it is not a plain tensor checkpoint "
                             f"(torch.load with weights_only=True failed: {cause}). "
                             "Only files holding tensors are read; code in pickles is never run.") from e
        obj = _unwrap(obj, prefer)
        return {k: _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}
    raise ValueError(f"unknown weights format {suffix!r} for {path}: use .npz, .safetensors or .pt")


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    import zipfile
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive; expected np.savez output holding one "
                         "array per state_dict key")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:  # object arrays: pickles, which are never loaded
        raise ValueError(f"{path} holds pickled (object) arrays, which are not loaded (they can "
                         "run code); save plain numeric arrays with np.savez") from e


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(str(path)))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid .safetensors file ({e}); expected a "
                         "safetensors state_dict (download it again if it is truncated)") from e


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a state_dict as .safetensors or .npz (by suffix), atomically."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file(arrays, str(tmp))
    elif path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        raise ValueError(f"unknown weights format {path.suffix!r}: use .safetensors or .npz")
    os.replace(tmp, path)
