"""Parameters, Gflops (MACs) and I/O shapes of a registered model at an image resolution (``cli.py model-info``)."""

from __future__ import annotations

from typing import Any

from dico.profiling import count_macs, count_parameters

from .registry import create_model

VAE_DOWNSAMPLING = 8  # SD-VAE: a 256x256 image is a 32x32 latent


def model_info(name: str, image_size: int = 256, macs: bool = True, **overrides: Any) -> dict[str, Any]:
    """Parameters, Gflops (MACs) and I/O shapes of the registered model ``name`` on ``image_size`` images."""
    if image_size % VAE_DOWNSAMPLING:
        raise ValueError(f"image size must be a multiple of {VAE_DOWNSAMPLING} (the VAE's downsampling)")
    latent = overrides.pop("input_size", image_size // VAE_DOWNSAMPLING)  # model_kwargs' input_size wins
    image_size = latent * VAE_DOWNSAMPLING
    model = create_model(name, input_size=latent, **overrides)
    c = model.in_channels
    params = count_parameters(model)
    info: dict[str, Any] = {
        "model": name,
        "image_size": image_size,
        "input_shape": [c, latent, latent],
        "output_shape": [model.out_channels, latent, latent],
        "num_classes": model.num_classes,
        "params": params,
        "params_M": round(params / 1e6, 2),
    }
    if macs:
        info["gmacs"] = round(count_macs(model, latent, c) / 1e9, 3)
    return info
