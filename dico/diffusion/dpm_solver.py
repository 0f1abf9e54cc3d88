"""DPM-Solver++ through diffusers' ``DPMSolverMultistepScheduler``, configured from our own training process."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .gaussian_diffusion import GaussianDiffusion


def dpm_solver_sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    steps: int,
    diffusion: GaussianDiffusion,
    model_kwargs: dict | None = None,
    clip_denoised: bool = False,
    order: int = 2,
    progress: bool = False,
) -> Tensor:
    """Sample with DPM-Solver++ (multistep, order ``order``) in ``steps`` model evaluations.

    The scheduler is built from ``diffusion.betas`` (the module's own schedule and length, e.g. cosine or
    T=500), so its timesteps index the process the model was trained on. The model's noise prediction (its
    first C output channels when it learns sigma) is turned into the x0 prediction here, clipped to [-1, 1]
    when ``clip_denoised``, and handed to the scheduler as ``prediction_type="sample"``: DPM-Solver++ steps
    on x0, so this is the same update with ADM's clipping.
    """
    from diffusers import DPMSolverMultistepScheduler

    if diffusion.respaced:
        raise ValueError(
            "DPM-Solver++ picks its own timesteps: give it the full training process (sampling_diffusion('dpm++', "
            "...)), not a respaced one"
        )
    if steps < 1 or steps > diffusion.num_timesteps:
        raise ValueError(f"DPM-Solver++ steps must be in 1..{diffusion.num_timesteps}, got {steps}")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion.betas.tolist(),
        algorithm_type="dpmsolver++",
        solver_order=order,
        prediction_type="sample",
        lower_order_final=True,
    )
    scheduler.set_timesteps(steps, device=noise.device)
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64, device=noise.device)
    x = noise
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling (DPM-Solver++)")
    channels = x.shape[1]
    with torch.no_grad():
        for t in timesteps:
            out = model(x, t.expand(x.shape[0]).long(), **(model_kwargs or {}))
            eps = out[:, :channels] if diffusion.learn_sigma else out
            a = abar[t.long()]
            x0 = ((x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).to(x.dtype)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            x = scheduler.step(x0, t, x).prev_sample
    return x
