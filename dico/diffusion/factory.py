"""``create_diffusion``: the DiT/DiCo configuration of the Gaussian diffusion, by name and respacing."""

from __future__ import annotations

from collections.abc import Sequence

from .gaussian_diffusion import GaussianDiffusion
from .schedule import named_betas, respaced_betas, space_timesteps


def create_diffusion(
    timestep_respacing: str | Sequence[int] = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The DiT/DiCo diffusion: linear schedule over 1000 steps, noise prediction, learned-range variance.

    ``timestep_respacing``: ``""`` (all steps, for training), ``"250"`` (the paper's sampler), ``"ddim50"``,
    section counts ``"10,15,20"`` or an explicit list of section counts.
    """
    betas = named_betas(noise_schedule, diffusion_steps)
    keep = space_timesteps(diffusion_steps, timestep_respacing)
    return GaussianDiffusion(
        respaced_betas(betas, keep),
        timestep_map=keep,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        predict_xstart=predict_xstart,
        rescale_learned_sigmas=rescale_learned_sigmas,
    )
