"""The diffusion loss on a fixed set: fixed timesteps and fixed noise, so that it depends on the weights alone.

A training loss estimate draws a timestep and a noise per sample, and its spread over draws hides differences
between models. Here every sample is scored at ``timesteps_per_sample`` stratified timesteps (one per equal
slice of [0, T), at an offset fixed per sample) with noise drawn once from ``seed``: two models (or two training
seeds) are scored on exactly the same noisy inputs, and the same weights give a bit-identical score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Model = Callable[..., Tensor]


def fixed_draws(
    num_samples: int, shape: tuple[int, ...], num_timesteps: int, timesteps_per_sample: int, seed: int
) -> tuple[Tensor, Tensor]:
    """(t (N*K,) int64, noise (N*K, *shape) float32) on the CPU; row ``i*K + j`` is sample i at slot j."""
    g = torch.Generator().manual_seed(seed)
    k = timesteps_per_sample
    offset = torch.rand(num_samples, 1, generator=g, dtype=torch.float64)
    slots = torch.arange(k, dtype=torch.float64)[None]
    t = ((slots + offset) * num_timesteps / k).floor().long().clamp_(0, num_timesteps - 1).reshape(-1)
    noise = torch.randn(num_samples * k, *shape, generator=g)
    return t, noise


@torch.no_grad()
def heldout_losses(
    diffusion: Any,
    model: Model,
    x: Tensor,
    y: Tensor,
    timesteps_per_sample: int = 8,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean of each loss term (``loss``, ``mse``, ``vb`` with a learned sigma) of ``diffusion.training_losses``
    over ``x`` (N, C, H, W) with labels ``y`` (N,) at fixed timesteps and noise (:func:`fixed_draws`); the
    class label is always given (no dropout). Summed in float64 in a fixed order of fixed batches."""
    k = timesteps_per_sample
    t, noise = fixed_draws(len(x), tuple(x.shape[1:]), diffusion.num_timesteps, k, seed)
    device = x.device
    xs, ys = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
    sums: dict[str, Tensor] = {}
    for start in range(0, len(xs), batch_size):
        sl = slice(start, start + batch_size)
        terms = diffusion.training_losses(
            model,
            xs[sl],
            t[sl].to(device),
            model_kwargs={"y": ys[sl]},
            noise=noise[sl].to(device=device, dtype=x.dtype),
        )
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.double().sum().cpu()
    return {name: float(total / len(xs)) for name, total in sums.items()}
