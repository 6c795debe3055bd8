"""Model names -> constructor arguments, and `build_model`.

Official names ("DiT-XL/2", "U-DiT-B", ...) map to the arguments of the official
constructors; the generic family names "DiT" and "U-DiT" take those arguments directly.
"""

from __future__ import annotations

from typing import Any

# DiT paper Table 4 configurations: (depth, hidden_size, num_heads) per size, patch 2/4/8.
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CONFIGS: dict[str, dict[str, Any]] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in _DIT_SIZES.items() for patch in (2, 4, 8)
}

# Released U-DiT configurations (udit_models.py U_DiT_S/B/L).
_UDIT_COMMON = dict(down_factor=2, depth=(2, 5, 8, 5, 2), mlp_ratio=2, ffn_type="rep", rep=1,
                    attn_type="v2", posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)
UDIT_CONFIGS: dict[str, dict[str, Any]] = {
    "U-DiT-S": dict(_UDIT_COMMON, hidden_size=96, num_heads=4),
    "U-DiT-B": dict(_UDIT_COMMON, hidden_size=192, num_heads=8),
    "U-DiT-L": dict(_UDIT_COMMON, hidden_size=384, num_heads=16),
}

FAMILIES = ("DiT", "U-DiT")


def model_names() -> list[str]:
    return sorted(DIT_CONFIGS) + sorted(UDIT_CONFIGS) + list(FAMILIES)


def resolve(name: str, **overrides) -> tuple[str, dict[str, Any]]:
    """(family, constructor kwargs) for a model name plus overrides."""
    if name in DIT_CONFIGS:
        return "DiT", {**DIT_CONFIGS[name], **overrides}
    if name in UDIT_CONFIGS:
        return "U-DiT", {**UDIT_CONFIGS[name], **overrides}
    if name in FAMILIES:
        return name, dict(overrides)
    raise ValueError(f"unknown model name {name!r}; known names: {', '.join(model_names())}")


def model_family(name: str) -> str:
    """"DiT" or "U-DiT" for a model name; ValueError for an unknown one."""
    return resolve(name)[0]


def build_model(name: str, **overrides):
    """A Flax module for `name` ("DiT-XL/2", "U-DiT-B", or the family "DiT" / "U-DiT").

    Overrides take the official constructor's argument names (input_size, in_channels,
    num_classes, hidden_size, depth, num_heads, ...) plus this port's options (dtype,
    remat, attention_impl, ...; see DiT and UDiT).
    """
    family, kwargs = resolve(name, **overrides)
    if "depth" in kwargs and isinstance(kwargs["depth"], list):
        kwargs["depth"] = tuple(kwargs["depth"])
    if family == "DiT":
        from udit_jax.models.dit import DiT as cls
    else:
        from udit_jax.models.udit import UDiT as cls
    import dataclasses
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"{family} has no argument(s) {sorted(unknown)}; it takes {sorted(fields)}")
    model = cls(**kwargs)
    model.validate()
    return model
