"""One entry point for generation: sampler + respacing + guidance, with reproducible noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .factory import create_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .guidance import GuidanceMode, guided

SamplerName = Literal["iddpm", "ddim", "dpm++"]
SAMPLERS: tuple[str, ...] = ("iddpm", "ddim", "dpm++")


def sampling_diffusion(
    sampler: str = "iddpm",
    steps: int = 250,
    diffusion_steps: int = 1000,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
) -> GaussianDiffusion:
    """The respaced process a sampler runs on: ``str(steps)`` sections for iDDPM; DDIM's integer stride
    (``"ddimN"``) when one gives exactly N steps, else evenly spaced sections. (DPM-Solver++ brings its own
    timesteps; it gets the full process here.)"""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    spec = str(steps) if sampler != "dpm++" else ""
    if sampler == "ddim" and any(len(range(0, diffusion_steps, s)) == steps for s in range(1, diffusion_steps)):
        spec = f"ddim{steps}"
    return create_diffusion(spec, noise_schedule, learn_sigma=learn_sigma, diffusion_steps=diffusion_steps)


def generate(
    model: Callable[..., Tensor],
    labels: Tensor,
    shape: tuple[int, ...],
    null_label: int | None,
    sampler: str = "iddpm",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_mode: GuidanceMode = "official",
    eta: float = 0.0,
    seed: int = 0,
    clip_denoised: bool = False,
    diffusion: GaussianDiffusion | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample ``len(labels)`` items of ``shape`` (C, H, W) for the given class labels.

    All randomness (initial and per-step noise) comes from one generator seeded with ``seed``, so a batch of
    labels and a seed always give the same samples. Guidance batches the conditional and unconditional
    halves into one forward per step.
    """
    if cfg_scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs a model trained with label dropout (class_dropout_prob > 0)")
    diffusion = diffusion or sampling_diffusion(sampler, steps)
    net = guided(model, cfg_scale, null_label if null_label is not None else -1, guidance_mode)
    device = labels.device
    generator = torch.Generator(device).manual_seed(seed)
    noise = torch.randn((len(labels), *shape), generator=generator, device=device)
    if sampler == "dpm++":
        from .dpm_solver import dpm_solver_sample

        return dpm_solver_sample(net, noise, steps, diffusion, {"y": labels}, clip_denoised, progress=progress)
    kwargs = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs={"y": labels}, progress=progress)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(net, noise.shape, eta=eta, generator=generator, **kwargs)
    return diffusion.p_sample_loop(net, noise.shape, generator=generator, **kwargs)
