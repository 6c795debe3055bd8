"""Generic machinery for moving weights between official PyTorch state_dicts and Flax params.

A model's converter lists one `KeySpec` per parameter: the official key, the Flax path and
the layout change between them. Everything else (checking for missing, left-over and
wrongly shaped keys, building the nested params, and the way back) is shared here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

# Layouts: how a PyTorch tensor becomes the Flax array.
LINEAR = "linear"        # nn.Linear weight (out, in)            -> Dense kernel (in, out)
CONV = "conv"            # nn.Conv2d weight (out, in/g, kh, kw)   -> Conv kernel (kh, kw, in/g, out)
SAME = "same"            # bias, embedding table, ...             -> unchanged
RESHAPE = "reshape"      # same data, other shape (e.g. logit_scale (h, 1, 1) -> (h,))


@dataclasses.dataclass(frozen=True)
class KeySpec:
    torch_key: str
    flax_path: tuple[str, ...]
    layout: str
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]


class ConversionError(ValueError):
    """A state_dict does not fit the model it is converted for."""


def torch_shape_of(layout: str, flax_shape: tuple[int, ...], torch_shape: tuple[int, ...] | None = None):
    if layout == LINEAR:
        return (flax_shape[1], flax_shape[0])
    if layout == CONV:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if layout == SAME:
        return tuple(flax_shape)
    if layout == RESHAPE:
        assert torch_shape is not None, "RESHAPE needs the torch shape"
        return tuple(torch_shape)
    raise ValueError(f"unknown layout {layout!r}")


def to_flax(array: np.ndarray, spec: KeySpec) -> np.ndarray:
    if spec.layout == LINEAR:
        return np.ascontiguousarray(array.T)
    if spec.layout == CONV:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(array.reshape(spec.flax_shape))


def to_torch(array: np.ndarray, spec: KeySpec) -> np.ndarray:
    if spec.layout == LINEAR:
        return np.ascontiguousarray(array.T)
    if spec.layout == CONV:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array.reshape(spec.torch_shape))


def abstract_param_shapes(model, *init_args, **init_kwargs) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of the model's params, computed without allocating them."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args, **init_kwargs))
    params = variables["params"]
    params = jax.tree_util.tree_map(lambda x: x, params)
    from flax import linen as nn
    params = nn.unbox(params)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def build_specs(flax_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
                describe: Callable[[tuple[str, ...], tuple[int, ...]], tuple[str, str, tuple[int, ...] | None]],
                ) -> list[KeySpec]:
    """One KeySpec per Flax param; `describe(path, shape)` returns (torch_key, layout, torch_shape|None)."""
    specs = []
    for path, shape in flax_shapes.items():
        torch_key, layout, torch_shape = describe(path, shape)
        specs.append(KeySpec(torch_key, path, layout, tuple(shape),
                             torch_shape_of(layout, tuple(shape), torch_shape)))
    return specs


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(specs: list[KeySpec], state_dict: Mapping[str, Any], model_desc: str,
                     ignore: Iterable[str] = ()) -> None:
    """Raises ConversionError listing missing, unexpected and wrongly shaped keys."""
    expected = {s.torch_key: s for s in specs}
    ignore = set(ignore)
    given = set(state_dict) - ignore
    missing = set(expected) - given
    unexpected = given - set(expected)
    wrong = [f"{k}: got {tuple(np.shape(state_dict[k]))}, expected {expected[k].torch_shape}"
             for k in sorted(given & set(expected))
             if tuple(np.shape(state_dict[k])) != expected[k].torch_shape]
    if missing or unexpected or wrong:
        parts = [f"state_dict does not fit {model_desc}:"]
        if missing:
            parts.append(f"  {len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if wrong:
            parts.append(f"  {len(wrong)} keys with the wrong shape: " + "; ".join(wrong[:20])
                         + (f"; ... ({len(wrong) - 20} more)" if len(wrong) > 20 else ""))
        parts.append("  Check that the checkpoint belongs to this model and configuration "
                     "(name, size, input size, class count).")
        raise ConversionError("\n".join(parts))


def params_from_state_dict(specs: list[KeySpec], state_dict: Mapping[str, Any], model_desc: str,
                           ignore: Iterable[str] = ()) -> dict:
    """Nested Flax params (numpy float32... as stored) from an official state_dict."""
    check_state_dict(specs, state_dict, model_desc, ignore)
    flat = {s.flax_path: to_flax(np.asarray(state_dict[s.torch_key]), s) for s in specs}
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(specs: list[KeySpec], params: Mapping) -> dict[str, np.ndarray]:
    """Official-name state_dict (numpy arrays, PyTorch layouts) from Flax params."""
    from flax import linen as nn
    flat = traverse_util.flatten_dict(nn.unbox(dict(params)) if not isinstance(params, dict) else nn.unbox(params))
    out = {}
    for s in specs:
        if s.flax_path not in flat:
            raise ConversionError(f"params lack {'/'.join(s.flax_path)} (torch key {s.torch_key})")
        out[s.torch_key] = to_torch(np.asarray(jax.device_get(flat[s.flax_path])), s)
    return out
