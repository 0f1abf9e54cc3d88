"""DiCo: the U-shaped diffusion ConvNet (arXiv 2505.11196) and its named sizes (Table 5).

Stages run at widths D, 2D, 4D, 2D, 2D on resolutions H, H/2, H/4, H/2, H:

    stem 3x3 -> encoder1 (D) -> down -> encoder2 (2D) -> down -> middle (4D)
             -> up -> cat(encoder2) -> 1x1 -> decoder2 (2D) -> up -> cat(encoder1) -> 1x1 -> decoder1 (2D)
             -> modulated norm -> 3x3 head (noise and variance)

Down = 3x3 conv (C -> C/2) + pixel-unshuffle; up = 3x3 conv (C -> 2C) + pixel-shuffle. Each width has its
own timestep/label embedder; encoder1 is conditioned at width D, the middle at 4D, everything else at 2D.

Inside, feature maps are channels-last (B, H, W, C), so the 1x1 convolutions -- most of the work -- are matrix
products; parameters and the state dict keep the ``Conv2d`` layout, and outputs equal the published code's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import DiffusionBackbone
from .blocks import DiCoBlock, FinalLayer
from .layers import PointwiseConv, SpatialConv
from .mixers import ConvFFN, build_mixer
from .registry import register_configs


class Resample(nn.Sequential):
    """Channels-last (B, H, W, C) -> 3x3 conv -> pixel-(un)shuffle -> channels-last.

    ``down``: (B, H, W, C) -> (B, H/2, W/2, 2C) (conv to C/2, unshuffle); else (B, 2H, 2W, C/2) (conv to 2C, shuffle).
    """

    def __init__(self, dim: int, down: bool) -> None:
        conv = nn.Conv2d(dim, dim // 2 if down else dim * 2, 3, padding=1, bias=False)
        super().__init__(conv, nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


class DiCo(DiffusionBackbone):
    """DiCo backbone of width ``hidden_size`` (D) and stage depths ``depth``. ``mixer``/``mixer_kwargs`` choose the
    token mixer of every block (default: the conv module with compact channel attention); ``ffn_act`` the FFN
    activation. Mixers that take a ``resolution`` get their stage's (H, W) at ``input_size`` (see
    :func:`build_mixer`). ``backbone``: the keywords of :class:`~dico.models.base.DiffusionBackbone`."""

    size_multiple = 4

    def __init__(
        self,
        hidden_size: int = 128,
        depth: Sequence[int] = (5, 4, 4, 4, 4),
        mlp_ratio: float = 2.0,
        mixer: str = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
        ffn_act: str = "gelu",
        **backbone: Any,
    ) -> None:
        if len(depth) != 5:
            raise ValueError(f"DiCo needs five stage depths [enc1, enc2, middle, dec2, dec1], got {list(depth)}")
        d = hidden_size
        super().__init__(cond_widths=(d, 2 * d, 4 * d), **backbone)
        self.depth = list(depth)
        self.hidden_size = d

        def stage(dim: int, n: int, size: int) -> nn.ModuleList:
            return nn.ModuleList(
                DiCoBlock(
                    dim,
                    build_mixer(mixer, dim, i, resolution=(size, size), **(mixer_kwargs or {})),
                    ConvFFN(dim, mlp_ratio, ffn_act),
                )
                for i in range(n)
            )

        size = self.input_size
        self.stem = SpatialConv(self.in_channels, d, 3)
        self.encoder1 = stage(d, depth[0], size)
        self.down1 = Resample(d, down=True)
        self.encoder2 = stage(2 * d, depth[1], size // 2)
        self.down2 = Resample(2 * d, down=True)
        self.middle = stage(4 * d, depth[2], size // 4)
        self.up2 = Resample(4 * d, down=False)
        self.fuse2 = PointwiseConv(4 * d, 2 * d)
        self.decoder2 = stage(2 * d, depth[3], size // 2)
        self.up1 = Resample(2 * d, down=False)
        self.fuse1 = PointwiseConv(2 * d, 2 * d)
        self.decoder1 = stage(2 * d, depth[4], size)
        self.head = FinalLayer(2 * d, SpatialConv(2 * d, self.out_channels, 3))
        self.reset_parameters()

    def blocks(self) -> list[DiCoBlock]:
        return [*self.encoder1, *self.encoder2, *self.middle, *self.decoder2, *self.decoder1]

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_channels, H, W). Labels are dropped at train time."""
        c1, c2, c3 = self.condition(x, t, y, force_drop)  # widths D, 2D, 4D

        h = self.stem(x.permute(0, 2, 3, 1))
        for block in self.encoder1:
            h = block(h, c1)
        skip1 = h
        h = self.down1(h)
        for block in self.encoder2:
            h = block(h, c2)
        skip2 = h
        h = self.down2(h)
        for block in self.middle:
            h = block(h, c3)
        h = self.fuse2(torch.cat([self.up2(h), skip2], dim=-1))
        for block in self.decoder2:
            h = block(h, c2)
        h = self.fuse1(torch.cat([self.up1(h), skip1], dim=-1))
        for block in self.decoder1:
            h = block(h, c2)
        return self.head(h, c2).permute(0, 3, 1, 2).contiguous()


# Table 5 of the paper.
DICO_CONFIGS: dict[str, dict[str, Any]] = {
    "DiCo-S": dict(hidden_size=128, depth=(5, 4, 4, 4, 4), mlp_ratio=2),
    "DiCo-B": dict(hidden_size=256, depth=(5, 4, 4, 4, 4), mlp_ratio=2),
    "DiCo-L": dict(hidden_size=352, depth=(9, 8, 9, 8, 9), mlp_ratio=2),
    "DiCo-XL": dict(hidden_size=416, depth=(9, 9, 10, 9, 9), mlp_ratio=2),
    "DiCo-H": dict(hidden_size=416, depth=(14, 12, 10, 12, 14), mlp_ratio=4),
}


register_configs(DiCo, DICO_CONFIGS)
