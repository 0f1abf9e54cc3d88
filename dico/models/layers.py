"""Small shared layers: channel-wise LayerNorm for feature maps, adaLN modulation helpers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map.

    On a channels-last tensor both permutes are views, so no copy is made.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = False) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def as_map(v: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1), to broadcast a per-sample vector over a feature map."""
    return v[:, :, None, None]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale are (B, C), x is (B, C, ...) or (B, N, C)."""
    if x.ndim == 4:
        shift, scale = as_map(shift), as_map(scale)
    else:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Sequential):
    """SiLU -> Linear(dim, n * dim): the adaLN-Zero projection of the condition vector.

    Zero-initialised by the owning model so that every residual branch starts as the identity.
    """

    def __init__(self, cond_dim: int, dim: int, n: int) -> None:
        super().__init__(nn.SiLU(), nn.Linear(cond_dim, n * dim))
        self.n = n

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return super().forward(c).chunk(self.n, dim=1)


def activation(name: str) -> nn.Module:
    """Activation by name: ``gelu`` (exact), ``gelu_tanh``, ``relu``, ``silu``."""
    table = {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": lambda: nn.ReLU(),
        "silu": lambda: nn.SiLU(),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


def zero_init_(module: nn.Module) -> None:
    """Set every parameter of ``module`` to zero (adaLN-Zero and output heads)."""
    for p in module.parameters():
        nn.init.zeros_(p)


def xavier_init_(module: nn.Module, as_matrix: bool = False) -> None:
    """Xavier-uniform weights and zero biases on every Linear/Conv2d below ``module``.

    ``as_matrix`` treats a conv kernel as a (out, in * k * k) matrix, as the published code does for
    the input stem ("initialise the patch embedding like a Linear").
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1) if as_matrix else w)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "AdaLNModulation",
    "LayerNorm2d",
    "activation",
    "as_map",
    "count_parameters",
    "modulate",
    "xavier_init_",
    "zero_init_",
]
