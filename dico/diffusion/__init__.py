"""Gaussian diffusion: schedule, loss terms, respacing, samplers and classifier-free guidance.

Takes the model as a callable; imports no backbone.
"""

from __future__ import annotations

from .factory import create_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .guidance import GUIDANCE_MODES, ClassifierFreeGuidance, guided
from .options import SamplingOptions
from .sampling import SAMPLERS, generate, sampling_diffusion
from .schedule import space_timesteps

__all__ = [
    "GUIDANCE_MODES",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "SamplingOptions",
    "create_diffusion",
    "generate",
    "guided",
    "sampling_diffusion",
    "space_timesteps",
]
