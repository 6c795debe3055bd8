"""Timestep respacing: which steps of the original process a shorter sampler keeps.

Same rules as the official `space_timesteps` (DiT / IDDPM): "250" spreads 250 steps over the
whole process, "10,15,20" splits the process into equal sections with that many steps each,
"ddim50" takes the integer stride from the DDIM paper. Fractional strides are accumulated as a
Python float and rounded with Python's `round` (half to even), which is what decides the
official 250-step map (..., 160, 164, 169, ...).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted original timesteps kept by a respacing.

    num_timesteps: steps of the original process (e.g. 1000).
    section_counts: "250", "10,15,20", "ddimN", or a sequence of per-section counts.
    Raises ValueError for a malformed string or a count the process cannot provide.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, text)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r} is not understood; use a step count "
                "('250'), comma-separated per-section counts ('10,15,20') or 'ddimN'") from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"timestep respacing {section_counts!r}: every section needs at least one step")
    if len(counts) > num_timesteps:
        raise ValueError(f"timestep respacing {section_counts!r} has {len(counts)} sections but the "
                         f"process has only {num_timesteps} steps")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"timestep respacing {section_counts!r} asks for {count} steps from a section of "
                f"{size} steps (the process has {num_timesteps} steps in {len(counts)} section(s)); "
                "ask for fewer steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # Python round: half to even, as upstream
            position += stride
        start += size
    return sorted(set(kept))


def _ddim_timesteps(num_timesteps: int, text: str) -> list[int]:
    try:
        desired = int(text[len("ddim"):])
    except ValueError:
        raise ValueError(f"timestep respacing {text!r}: expected 'ddimN' with an integer N, "
                         "e.g. 'ddim50'") from None
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == desired:
            return list(steps)
    if desired < 1:
        raise ValueError(f"timestep respacing {text!r}: DDIM needs at least 1 step, e.g. 'ddim50'")
    raise ValueError(f"timestep respacing {text!r}: no integer stride gives exactly {desired} steps "
                     f"out of {num_timesteps}; pick another N or use a plain count such as "
                     f"'{desired}'")


def respace_betas(base_betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that visits only `use_timesteps`, and the original step of each.

    beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}] (float64), so that the kept steps have exactly
    the original cumulative alphas. Upstream applies this even without respacing, which is why
    beta'_0 = 9.999999999998899e-05 rather than 1e-4.
    Returns (betas [S] float64, timestep_map [S] int64).
    """
    base_betas = np.asarray(base_betas, np.float64)
    keep = set(int(t) for t in use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - base_betas)
    last, betas, timestep_map = 1.0, [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in keep:
            betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    return np.array(betas, np.float64), np.array(timestep_map, np.int64)
