"""Parameter and multiply-accumulate counts (the paper's "Gflops": torchprofile MACs of one forward)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

VAE_DOWNSAMPLING = 8  # SD-VAE: a 256x256 image is a 32x32 latent


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (DiT's fixed positions), as the published counts are."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_channels: int = 4, batch_size: int = 1) -> int:
    """torchprofile multiply-accumulates of ``model(x, t, y)`` on a (batch, C, size, size) input."""
    try:
        from torchprofile import profile_macs
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MAC counting needs torchprofile>=0.1.0: pip install 'torchprofile>=0.1.0'") from e
    x = torch.randn(batch_size, in_channels, input_size, input_size)
    t = torch.ones(batch_size, dtype=torch.long)
    y = torch.ones(batch_size, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no handlers" for zero-cost ops (exp, pixel_shuffle, unbind)
            return int(profile_macs(model, (x, t, y)))
    finally:
        model.train(was_training)


def model_info(name: str, image_size: int = 256, macs: bool = True, **overrides: Any) -> dict[str, Any]:
    """Parameters, Gflops (MACs) and I/O shapes of a registered model at an image resolution."""
    from dico.models import create_model

    if image_size % VAE_DOWNSAMPLING:
        raise ValueError(f"image size must be a multiple of {VAE_DOWNSAMPLING} (the VAE's downsampling)")
    latent = image_size // VAE_DOWNSAMPLING
    model = create_model(name, input_size=latent, **overrides)
    c = model.in_channels
    info: dict[str, Any] = {
        "model": name,
        "image_size": image_size,
        "input_shape": [c, latent, latent],
        "output_shape": [model.out_channels, latent, latent],
        "num_classes": model.num_classes,
        "params": count_parameters(model),
        "params_M": round(count_parameters(model) / 1e6, 2),
    }
    if macs:
        info["gmacs"] = round(count_macs(model, latent, c) / 1e9, 3)
    return info
