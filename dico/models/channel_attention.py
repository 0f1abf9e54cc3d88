"""Channel-attention modules used inside the conv module: (B, C, H, W) -> (B, C, H, W).

Every entry of ``CHANNEL_ATTENTION`` takes ``(dim, **kwargs)`` and returns a module that reweights the
channels of its input. DiCo uses :class:`CompactChannelAttention`; the ablation swaps it by name.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import CHANNEL_ATTENTION


@CHANNEL_ATTENTION.register("cca")
class CompactChannelAttention(nn.Module):
    """x * sigmoid(W . GAP(x)): one 1x1 conv (C -> C) on the globally pooled features (DiCo, Eq. 3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.proj(x.mean((2, 3), keepdim=True)).sigmoid()


@CHANNEL_ATTENTION.register("none")
class NoChannelAttention(nn.Identity):
    """The "w/o CCA" ablation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
