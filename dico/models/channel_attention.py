"""Channel-attention modules used inside the conv module: channels-last (B, H, W, C) -> (B, H, W, C).

Every entry of ``CHANNEL_ATTENTION`` takes ``(dim, **kwargs)`` and returns a module that reweights the
channels of its input. DiCo uses :class:`CompactChannelAttention`; the ablation swaps it by name.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import PointwiseConv
from .registry import CHANNEL_ATTENTION


@CHANNEL_ATTENTION.register("cca")
class CompactChannelAttention(nn.Module):
    """x * sigmoid(W . GAP(x)): one 1x1 conv (C -> C) on the globally pooled features (DiCo, Eq. 3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = PointwiseConv(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.proj(x.mean((1, 2), keepdim=True)).sigmoid()

    def weights(self, x: Tensor) -> Tensor:
        """The channel weights sigmoid(W . GAP(x)), (B, 1, 1, C), of channels-last ``x`` (the conv module's fast path).

        Pools with a sum, then divides the small result: the same values as ``mean`` (which sums, then divides),
        but its backward is a broadcast view where the mean's materialises grad / (H W) at full size.
        """
        return self.proj(x.sum((1, 2), keepdim=True) / (x.shape[1] * x.shape[2])).sigmoid()


@CHANNEL_ATTENTION.register("none")
class NoChannelAttention(nn.Identity):
    """The "w/o CCA" ablation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
