"""The SD-VAE through diffusers: load (offline-aware), encode to posterior moments, decode latents to images."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dico.runtime import hub_offline

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SCALE_FACTOR = 0.18215


def load_vae(path_or_id: str = DEFAULT_VAE, device: torch.device | str = "cpu") -> Any:
    """``AutoencoderKL.from_pretrained`` from a local folder or a hub id (cached, or downloaded when online).

    Offline without a cached copy, the error says which folder to pass instead.
    """
    from diffusers.models import AutoencoderKL

    local = Path(path_or_id).expanduser()
    offline = hub_offline()
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else path_or_id, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load the VAE {path_or_id!r}{' (HF_HUB_OFFLINE is set)' if offline else ''}: {e}\n"
            "Pass a local folder holding config.json and the weights (e.g. a `save_pretrained` copy of "
            f"{DEFAULT_VAE}) with --vae PATH, or download it once while online."
        ) from e
    return vae.to(device).eval().requires_grad_(False)


def vae_location(path_or_id: str) -> str:
    """A local VAE folder as its absolute path, a hub id as given: what a cache or checkpoint records, so that it
    decodes from any working folder."""
    local = Path(path_or_id).expanduser()
    return str(local.resolve()) if local.exists() else path_or_id


def vae_weights_sha256(vae: Any) -> str:
    """sha256 of a VAE's weights: every state-dict entry's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in vae.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vae_scale_factor(vae: Any) -> float:
    """The latent scale factor from the VAE's config (``scaling_factor``), else SD's 0.18215."""
    return float(getattr(getattr(vae, "config", None), "scaling_factor", None) or SCALE_FACTOR)


@torch.no_grad()
def encode_moments(vae: Any, images: Tensor) -> tuple[Tensor, Tensor]:
    """Images in [-1, 1] (B, 3, H, W) -> posterior mean and std (B, 4, H/8, W/8), unscaled."""
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor, scale_factor: float = SCALE_FACTOR) -> Tensor:
    """Scaled latents -> images in [-1, 1]."""
    return vae.decode(latents / scale_factor).sample.clamp(-1, 1)
