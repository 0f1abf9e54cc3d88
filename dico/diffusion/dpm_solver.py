"""DPM-Solver++ through diffusers' ``DPMSolverMultistepScheduler``, configured to match our training process."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def dpm_solver_sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    steps: int,
    model_kwargs: dict | None = None,
    learn_sigma: bool = True,
    order: int = 2,
    progress: bool = False,
) -> Tensor:
    """Sample with DPM-Solver++ (multistep, order ``order``) in ``steps`` model evaluations.

    The scheduler gets the same linear beta schedule (1e-4 .. 0.02 over 1000 steps) and the noise prediction,
    the model's first C output channels. (We slice them here: diffusers' ``variance_type="learned_range"`` keeps
    ``[:, :3]``, which is only right for 3-channel images.)
    """
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=order, prediction_type="epsilon",
        lower_order_final=True,
    )  # fmt: skip
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling (DPM-Solver++)")
    with torch.no_grad():
        for t in timesteps:
            out = model(x, t.expand(x.shape[0]).long(), **(model_kwargs or {}))
            eps = out[:, : x.shape[1]] if learn_sigma else out
            x = scheduler.step(eps, t, x).prev_sample
    return x
