"""adaLN-Zero residual blocks on channels-last feature maps (B, H, W, C), conditioned on a vector c (B, C_c)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import AdaLNModulation, SpatialConv, channel_norm, gated_residual, may_overwrite, modulate_fused


class DiCoBlock(nn.Module):
    """x + g1 * mixer(mod(norm(x))) ; x + g2 * ffn(mod(norm(x))), shifts/scales/gates from c.

    The mixer and FFN are given, so the same block serves DiCo (conv module), the attention
    ablations and the "DiT (U-shape)" skeleton.
    """

    def __init__(self, dim: int, mixer: nn.Module, ffn: nn.Module, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = channel_norm(dim)
        self.mixer = mixer
        self.norm2 = channel_norm(dim)
        self.ffn = ffn
        self.modulation = AdaLNModulation(cond_dim or dim, dim, 6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        own = may_overwrite(self.norm1, self.norm2, self.ffn)  # inference: overwrite own intermediates, never x
        x = gated_residual(x, gate1, self.mixer(modulate_fused(self.norm1(x), shift1, scale1, own)))
        return gated_residual(x, gate2, self.ffn(modulate_fused(self.norm2(x), shift2, scale2, own)), own)


class FinalLayer2d(nn.Module):
    """Modulated non-affine LayerNorm, then a kxk conv head to the output channels."""

    def __init__(self, dim: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = channel_norm(dim)
        self.modulation = AdaLNModulation(dim, dim, 2)
        self.proj = SpatialConv(dim, out_channels, kernel_size)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)
        return self.proj(modulate_fused(self.norm(x), shift, scale, may_overwrite(self.norm)))


def run_with_long_skips(blocks: nn.ModuleList, skip_fuse: nn.ModuleList, h: Tensor, c: Tensor) -> Tensor:
    """Apply ``blocks(h, c)`` in order with U-ViT long skips: the outputs of the first ``len(skip_fuse)`` blocks
    are concatenated (channels last) with the inputs of the last ones in mirrored order, then reduced by
    ``skip_fuse[j]`` (Linear 2C -> C). With no ``skip_fuse`` this is a plain chain."""
    skips: list[Tensor] = []
    k, n = len(skip_fuse), len(blocks)
    for i, block in enumerate(blocks):
        j = n - 1 - i  # mirrored index from the end
        if j < k:
            h = skip_fuse[j](torch.cat([h, skips.pop()], dim=-1))
        h = block(h, c)
        if i < k:
            skips.append(h)
    return h
