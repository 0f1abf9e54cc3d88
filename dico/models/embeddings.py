"""Condition embeddings (timestep + class label) and fixed 2-D sin-cos positions."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): cosines first, then sines (GLIDE/DiT order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timesteps (N,) -> (N, dim) through sin-cos features and a 2-layer SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


class ConditionEmbedder(nn.Module):
    """Timestep + class-label embedding of one width: c = MLP(sincos(t)) + E[y].

    The table has ``num_classes + 1`` rows when classifier-free guidance is trained: the last row is
    the "null" label used for dropped labels. Label dropout itself is drawn once per sample by the
    owning model (:func:`drop_labels`), so that all widths of a U-shaped net see the same drop.
    """

    def __init__(self, dim: int, num_classes: int, null_label: bool = True) -> None:
        super().__init__()
        self.timestep = TimestepEmbedder(dim)
        self.label = nn.Embedding(num_classes + int(null_label), dim)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.timestep(t) + self.label(y)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.label.weight, std=0.02)
        nn.init.normal_(self.timestep.mlp[0].weight, std=0.02)
        nn.init.normal_(self.timestep.mlp[2].weight, std=0.02)


def drop_labels(y: Tensor, num_classes: int, prob: float, force_drop: Tensor | None = None) -> Tensor:
    """Replace labels by the null label ``num_classes`` with probability ``prob`` (or where ``force_drop``)."""
    drop = force_drop.bool() if force_drop is not None else torch.rand(y.shape[0], device=y.device) < prob
    return torch.where(drop, torch.full_like(y, num_classes), y)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions (grid*grid, dim), row-major; half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    coords = np.arange(grid, dtype=np.float64)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # The published grid puts the column coordinate first (meshgrid(w, h)), so the first half is x.
    emb = np.concatenate([one_axis(gx), one_axis(gy)], axis=1)
    return torch.from_numpy(emb).float()
