"""The isotropic skeleton of DiCo blocks (Table 3's "DiCo (iso.)" and "DiCo (iso.&skip)").

    p x p patchify conv -> DiCo blocks at one width on the (H/p, W/p) token map
                        -> optional U-ViT long skips -> modulated norm -> linear -> unpatchify

It is DiT's skeleton (:class:`~dico.models.dit.DiT`) with its transformer blocks swapped for
:class:`~dico.models.blocks.DiCoBlock` (any registered token mixer, a pointwise FFN) on channels-last token maps.
It has no position table: the blocks' depthwise convolutions see position through their zero padding.

``long_skips`` = k concatenates the outputs of the first k blocks with the inputs of the last k blocks (in
mirrored order) and reduces them with a Linear(2C -> C), as DiT's ``long_skips`` does.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import DiffusionBackbone
from .blocks import DiCoBlock, run_with_long_skips
from .embeddings import ConditionEmbedder, drop_labels
from .layers import AdaLNModulation, channel_norm, modulate, xavier_init_, zero_init_
from .mixers import ConvFFN, build_mixer


class IsotropicDiCo(DiffusionBackbone):
    """DiCo blocks at a single width and resolution, patch ``patch_size``, with optional U-ViT long skips."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        mlp_ratio: float = 2.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        long_skips: int = 0,
        mixer: str = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
        ffn_act: str = "gelu",
    ) -> None:
        super().__init__()
        if 2 * long_skips > depth:
            raise ValueError(f"{long_skips} long skips need at least {2 * long_skips} blocks, got depth {depth}")
        self.input_size = input_size
        self.patch_size = self.size_multiple = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.hidden_size = hidden_size
        self.depth = depth
        self.long_skips = long_skips

        grid = input_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.cond = ConditionEmbedder(hidden_size, num_classes, null_label=class_dropout_prob > 0)
        self.blocks = nn.ModuleList(
            DiCoBlock(
                hidden_size,
                build_mixer(mixer, hidden_size, i, resolution=(grid, grid), **(mixer_kwargs or {})),
                ConvFFN(hidden_size, mlp_ratio, ffn_act),
            )
            for i in range(depth)
        )
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(long_skips))
        self.norm_out = channel_norm(hidden_size)
        self.modulation_out = AdaLNModulation(hidden_size, hidden_size, 2)
        self.head = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's/DiCo's initialisation: Xavier everywhere, N(0, 0.02) embeddings, adaLN-Zero, zero head."""
        xavier_init_(self)
        xavier_init_(self.patch_embed, as_matrix=True)
        self.cond.reset_parameters()
        for block in self.blocks:
            zero_init_(block.modulation)
        zero_init_(self.modulation_out)
        zero_init_(self.head)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Channels-last (B, h, w, p*p*C) -> (B, C, h*p, w*p)."""
        b, gh, gw, _ = x.shape
        p, c = self.patch_size, self.out_channels
        x = x.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        self.check_inputs(x, t, y)
        if (self.training and self.class_dropout_prob > 0) or force_drop is not None:
            y = drop_labels(y, self.num_classes, self.class_dropout_prob, force_drop)
        c = self.cond(t, y)
        h = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)

        h = run_with_long_skips(self.blocks, self.skip_fuse, h, c)
        shift, scale = self.modulation_out(c)
        return self.unpatchify(self.head(modulate(self.norm_out(h), shift, scale)))


__all__ = ["IsotropicDiCo"]
