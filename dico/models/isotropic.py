"""The isotropic skeleton shared by DiT and Table 3's "DiCo (iso.)" / "DiCo (iso.&skip)":

    p x p patchify conv (+ fixed positions) -> blocks at one width on the (H/p, W/p) token grid
        -> optional U-ViT long skips -> modulated norm -> linear -> unpatchify

Tokens stay a channels-last grid (B, H/p, W/p, C), so attention blocks (DiT) and convolutional blocks (DiCo) run
on the same layout. :class:`~dico.models.dit.DiT` configures it with transformer blocks and sin-cos positions;
:class:`IsotropicDiCo` with :class:`~dico.models.blocks.DiCoBlock` (any registered token mixer, a pointwise FFN)
and no position table: the blocks' depthwise convolutions see position through their zero padding.

``long_skips`` = k concatenates the outputs of the first k blocks with the inputs of the last k blocks (in mirrored
order) and reduces them with a Linear(2C -> C).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .base import DiffusionBackbone
from .blocks import DiCoBlock, FinalLayer
from .embeddings import sincos_pos_embed_2d
from .mixers import ConvFFN, build_mixer


class IsotropicBackbone(DiffusionBackbone):
    """``blocks`` (each ``block(h (B, h, w, C), c (B, C)) -> h``) at width ``hidden_size`` on the grid of
    ``patch_size`` patches, with ``long_skips`` U-ViT skips.

    ``positions``: add DiT's fixed 2-D sin-cos positions (a frozen parameter, as published: it is in the state
    dict and the parameter count). ``backbone``: the keywords of :class:`~dico.models.base.DiffusionBackbone`.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        *,
        hidden_size: int,
        patch_size: int = 2,
        long_skips: int = 0,
        positions: bool = False,
        **backbone: Any,
    ) -> None:
        super().__init__(cond_widths=(hidden_size,), **backbone)
        self.blocks = nn.ModuleList(blocks)
        self.depth = len(self.blocks)
        if 2 * long_skips > self.depth:
            raise ValueError(f"{long_skips} long skips need at least {2 * long_skips} blocks, got depth {self.depth}")
        self.patch_size = self.size_multiple = patch_size
        self.hidden_size = hidden_size
        self.long_skips = long_skips

        self.stem = nn.Conv2d(self.in_channels, hidden_size, patch_size, stride=patch_size)  # patch embedding
        grid = self.input_size // patch_size
        frozen = nn.Parameter(torch.empty(1, grid * grid, hidden_size), requires_grad=False)
        self.pos_embed: nn.Parameter | None = frozen if positions else None
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(long_skips))
        self.head = FinalLayer(hidden_size, nn.Linear(hidden_size, patch_size * patch_size * self.out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.pos_embed is not None:
            grid = round(self.pos_embed.shape[1] ** 0.5)
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, grid)[None])

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """The fixed positions as a (1, grid_h, grid_w, C) map; recomputed for grids other than the built one."""
        if grid_h * grid_w == self.pos_embed.shape[1]:
            return self.pos_embed.view(1, grid_h, grid_w, -1)
        if grid_h != grid_w:
            raise ValueError(f"sin-cos positions are defined for square grids, got {grid_h}x{grid_w}")
        return sincos_pos_embed_2d(self.hidden_size, grid_h).view(1, grid_h, grid_w, -1).to(self.pos_embed)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Channels-last (B, h, w, p*p*C) -> (B, C, h*p, w*p)."""
        b, gh, gw, _ = x.shape
        p, c = self.patch_size, self.out_channels
        x = x.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_channels, H, W). Labels are dropped at train time."""
        (c,) = self.condition(x, t, y, force_drop)
        h = self.stem(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        if self.pos_embed is not None:
            h = h + self.positions(*h.shape[1:3])

        skips: list[Tensor] = []  # U-ViT long skips: block i's output joins block (depth - 1 - i)'s input
        for i, block in enumerate(self.blocks):
            j = self.depth - 1 - i
            if j < self.long_skips:
                h = self.skip_fuse[j](torch.cat([h, skips.pop()], dim=-1))
            h = block(h, c)
            if i < self.long_skips:
                skips.append(h)
        return self.unpatchify(self.head(h, c))


class IsotropicDiCo(IsotropicBackbone):
    """The isotropic skeleton with ``depth`` DiCo blocks (token mixer ``mixer``, pointwise FFN of ratio
    ``mlp_ratio``). ``skeleton``: ``long_skips`` and the keywords of :class:`~dico.models.base.DiffusionBackbone`."""

    def __init__(
        self,
        hidden_size: int = 384,
        depth: int = 12,
        mlp_ratio: float = 2.0,
        mixer: str = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
        ffn_act: str = "gelu",
        input_size: int = 32,
        patch_size: int = 2,
        **skeleton: Any,
    ) -> None:
        grid = (input_size // patch_size,) * 2  # the resolution of resolution-sized mixers
        blocks = [
            DiCoBlock(
                hidden_size,
                build_mixer(mixer, hidden_size, i, resolution=grid, **(mixer_kwargs or {})),
                ConvFFN(hidden_size, mlp_ratio, ffn_act),
            )
            for i in range(depth)
        ]
        super().__init__(blocks, hidden_size=hidden_size, input_size=input_size, patch_size=patch_size, **skeleton)


__all__ = ["IsotropicBackbone", "IsotropicDiCo"]
