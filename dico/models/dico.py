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
from .blocks import DiCoBlock, FinalLayer2d
from .embeddings import ConditionEmbedder, drop_labels
from .layers import PointwiseConv, SpatialConv, xavier_init_, zero_init_
from .mixers import ConvFFN, build_mixer
from .registry import register_model


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
    """DiCo backbone. ``mixer``/``mixer_kwargs`` choose the token mixer of every block (default: the
    conv module with compact channel attention); ``ffn_act`` the FFN activation. Mixers that take a
    ``resolution`` get their stage's (H, W) at ``input_size`` (see :func:`build_mixer`)."""

    size_multiple = 4

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        hidden_size: int = 128,
        depth: Sequence[int] = (5, 4, 4, 4, 4),
        mlp_ratio: float = 2.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mixer: str = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
        ffn_act: str = "gelu",
    ) -> None:
        super().__init__()
        if len(depth) != 5:
            raise ValueError(f"DiCo needs five stage depths [enc1, enc2, middle, dec2, dec1], got {list(depth)}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.depth = list(depth)
        d = hidden_size
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

        self.stem = SpatialConv(in_channels, d, 3)
        self.cond = nn.ModuleList(
            ConditionEmbedder(w, num_classes, null_label=class_dropout_prob > 0) for w in (d, 2 * d, 4 * d)
        )
        self.encoder1 = stage(d, depth[0], input_size)
        self.down1 = Resample(d, down=True)
        self.encoder2 = stage(2 * d, depth[1], input_size // 2)
        self.down2 = Resample(2 * d, down=True)
        self.middle = stage(4 * d, depth[2], input_size // 4)
        self.up2 = Resample(4 * d, down=False)
        self.fuse2 = PointwiseConv(4 * d, 2 * d)
        self.decoder2 = stage(2 * d, depth[3], input_size // 2)
        self.up1 = Resample(2 * d, down=False)
        self.fuse1 = PointwiseConv(2 * d, 2 * d)
        self.decoder1 = stage(2 * d, depth[4], input_size)
        self.head = FinalLayer2d(2 * d, self.out_channels)
        self.reset_parameters()

    def blocks(self) -> list[DiCoBlock]:
        return [*self.encoder1, *self.encoder2, *self.middle, *self.decoder2, *self.decoder1]

    def reset_parameters(self) -> None:
        """The published initialisation: Xavier everywhere, N(0, 0.02) embeddings, adaLN-Zero, zero head."""
        xavier_init_(self)
        xavier_init_(self.stem, as_matrix=True)
        for cond in self.cond:
            cond.reset_parameters()
        for block in self.blocks():
            zero_init_(block.modulation)
        zero_init_(self.head.modulation)
        zero_init_(self.head.proj)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_channels, H, W). Labels are dropped at train time."""
        self.check_inputs(x, t, y)
        if (self.training and self.class_dropout_prob > 0) or force_drop is not None:
            y = drop_labels(y, self.num_classes, self.class_dropout_prob, force_drop)
        c1, c2, c3 = (cond(t, y) for cond in self.cond)

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


def _register(name: str, config: dict[str, Any]) -> None:
    @register_model(name)
    def _build(**overrides: Any) -> DiCo:
        return DiCo(**{**config, **overrides})

    _build.__doc__ = f"{name}: {config}"


for _name, _config in DICO_CONFIGS.items():
    _register(_name, _config)
