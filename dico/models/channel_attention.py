"""Channel-attention modules used inside the conv module: channels-last (B, H, W, C) -> (B, H, W, C).

Every entry of ``CHANNEL_ATTENTION`` takes ``(dim, **kwargs)`` and returns a module that reweights the
channels of its input. DiCo uses :class:`CompactChannelAttention`; the ablation swaps it by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import PointwiseConv, SpatialConv, resolve_heads
from .registry import CHANNEL_ATTENTION


@CHANNEL_ATTENTION.register("cca")
class CompactChannelAttention(nn.Module):
    """x * sigmoid(W . GAP(x)): one 1x1 conv (C -> C) on the globally pooled features (DiCo, Eq. 3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = PointwiseConv(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.proj(x.mean((1, 2), keepdim=True)).sigmoid()


@CHANNEL_ATTENTION.register("none")
class NoChannelAttention(nn.Identity):
    """The "w/o CCA" ablation."""

    def __init__(self, dim: int) -> None:
        super().__init__()


@CHANNEL_ATTENTION.register("se")
class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al.): x * sigmoid(W2 . ReLU(W1 . GAP(x))), W1: C -> C / r, W2: C / r -> C.

    The "CCA -> SE" ablation: a bottleneck of ratio ``reduction`` (16, as in SENet) in place of CCA's one
    full C x C projection.
    """

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.reduce = PointwiseConv(dim, hidden)
        self.act = nn.ReLU()
        self.expand = PointwiseConv(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.expand(self.act(self.reduce(x.mean((1, 2), keepdim=True)))).sigmoid()


@CHANNEL_ATTENTION.register("channel_self_attention")
class ChannelSelfAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention (MDTA): self-attention across channels.

    1x1 conv to q, k, v (3C) then a 3x3 depthwise conv; per head, q and k (each d channels x H*W positions) are
    L2-normalised over space, the d x d map softmax(q k^T * temperature) (a learned temperature per head) mixes
    v's channels; a 1x1 conv projects out. Cost is linear in H*W. No biases, as in Restormer.
    The "CCA -> Channel Self-Attn" ablation puts it where CCA sits in the conv module.
    """

    def __init__(self, dim: int, num_heads: int | None = None, head_dim: int = 64, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = resolve_heads(dim, num_heads, head_dim)
        self.qkv = PointwiseConv(dim, 3 * dim, bias=bias)
        self.qkv_dw = SpatialConv(3 * dim, 3 * dim, 3, groups=3 * dim, bias=bias)
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1))
        self.proj = PointwiseConv(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        heads = self.num_heads
        # (B, H, W, 3C) -> 3 x (B, heads, d, H*W): channels ordered (q | k | v), each head-major
        q, k, v = self.qkv_dw(self.qkv(x)).reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # (B, heads, d, d)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, h, w, c))
