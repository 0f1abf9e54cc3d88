"""Classifier-free guidance as a model wrapper: one batched forward for the conditional and
unconditional halves, then eps = eps_u + s * (eps_c - eps_u)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

GuidanceMode = Literal["official", "all"]
GUIDANCE_MODES: tuple[str, ...] = ("official", "all")


def check_mode(mode: str) -> GuidanceMode:
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


class ClassifierFreeGuidance:
    """Wrap ``model(x, t, y)`` so that calling it with B samples returns the guided output for B samples.

    ``mode="official"`` guides only the first 3 output channels, exactly as the published DiT/DiCo sampling
    code does (their reported FIDs depend on it); ``mode="all"`` guides every noise channel (the standard
    formulation). The variance channels always come from the conditional pass.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        scale: float,
        null_label: int,
        mode: GuidanceMode = "official",
    ) -> None:
        self.model = model
        self.scale = float(scale)
        self.null_label = null_label
        self.mode = check_mode(mode)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, **kwargs: object) -> Tensor:
        b = x.shape[0]
        out = self.model(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_label)]), **kwargs
        )
        cond, uncond = out[:b], out[b:]
        n = 3 if self.mode == "official" else x.shape[1]
        guided = uncond[:, :n] + self.scale * (cond[:, :n] - uncond[:, :n])
        return torch.cat([guided, cond[:, n:]], dim=1)


def guided(
    model: Callable[..., Tensor],
    scale: float,
    null_label: int,
    mode: GuidanceMode = "official",
) -> Callable[..., Tensor]:
    """``model`` itself for scale 1 (no extra forward), else a :class:`ClassifierFreeGuidance` wrapper."""
    check_mode(mode)
    if scale == 1.0:
        return model
    return ClassifierFreeGuidance(model, scale, null_label, mode)
