"""Noise schedules and timestep respacing (iDDPM conventions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    """Ho et al.'s linear schedule 1e-4 .. 0.02 for 1000 steps, rescaled for other step counts (float64)."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (``squaredcos_cap_v2``)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    )


def named_betas(name: str, num_steps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_steps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; use 'linear' or 'squaredcos_cap_v2'")


def space_timesteps(num_steps: int, spec: str | Sequence[int]) -> list[int]:
    """The original timesteps kept by a respaced process, ascending.

    ``spec`` is ``"ddimN"`` (the DDIM paper's fixed integer stride giving exactly N steps), or section counts
    ``"250"`` / ``"10,15,20"`` / ``[250]``: the process is cut into equal sections and each section is
    strided (fractionally, rounded) to its count. ``""`` keeps every step.
    """
    if isinstance(spec, str):
        if spec == "":
            return list(range(num_steps))
        if spec.startswith("ddim"):
            count = int(spec[len("ddim") :])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == count:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot take exactly {count} steps of {num_steps} with an integer stride")
        spec = [int(s) for s in spec.split(",")]
    sections = list(spec)
    size_per, extra = divmod(num_steps, len(sections))
    start, steps = 0, []
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not j * stride: rounding must match the published respacing exactly
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def respaced_betas(betas: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Betas of the process that jumps between the kept timesteps with the same cumulative alphas."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept = alphas_cumprod[list(keep)]
    return 1.0 - kept / np.concatenate([[1.0], kept[:-1]])
