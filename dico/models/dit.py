"""DiT (Peebles & Xie, 2023): the isotropic transformer baseline with adaLN-Zero, patch 2."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DiffusionBackbone
from .blocks import run_with_long_skips
from .embeddings import ConditionEmbedder, drop_labels, sincos_pos_embed_2d
from .layers import AdaLNModulation, modulate, xavier_init_, zero_init_
from .registry import register_model


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C) with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    """Linear -> act -> Linear on tokens."""

    def __init__(self, dim: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block on tokens (B, N, C) with adaLN-Zero conditioning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))
        self.modulation = AdaLNModulation(dim, dim, 6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(DiffusionBackbone):
    """Patchify (p x p conv) + fixed sin-cos positions -> DiT blocks -> modulated norm -> linear -> unpatchify.

    ``long_skips`` > 0 adds U-ViT long skips: the outputs of the first ``long_skips`` blocks are
    concatenated with the inputs of the last ``long_skips`` blocks (in mirrored order) and reduced by a
    Linear(2C -> C) (the "iso.&skip" skeleton of the ablation).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        long_skips: int = 0,
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
        self.long_skips = long_skips

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        grid = input_size // patch_size
        # A frozen parameter, as in the published code: it is in the state dict and the parameter count.
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, hidden_size), requires_grad=False)
        self.cond = ConditionEmbedder(hidden_size, num_classes, null_label=class_dropout_prob > 0)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.skip_fuse = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(long_skips))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation_out = AdaLNModulation(hidden_size, hidden_size, 2)
        self.head = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        xavier_init_(self)
        xavier_init_(self.patch_embed, as_matrix=True)
        grid = round(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, grid)[None])
        self.cond.reset_parameters()
        for block in self.blocks:
            zero_init_(block.modulation)
        zero_init_(self.modulation_out)
        zero_init_(self.head)

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        if grid_h * grid_w == self.pos_embed.shape[1]:
            return self.pos_embed
        if grid_h != grid_w:
            raise ValueError(f"DiT positions are defined for square grids, got {grid_h}x{grid_w}")
        return sincos_pos_embed_2d(self.hidden_size, grid_h)[None].to(self.pos_embed)

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        x = x.view(x.shape[0], grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        self.check_inputs(x, t, y)
        if (self.training and self.class_dropout_prob > 0) or force_drop is not None:
            y = drop_labels(y, self.num_classes, self.class_dropout_prob, force_drop)
        c = self.cond(t, y)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.positions(gh, gw)

        h = run_with_long_skips(self.blocks, self.skip_fuse, h, c)
        shift, scale = self.modulation_out(c)
        h = self.head(modulate(self.norm_out(h), shift, scale))
        return self.unpatchify(h, gh, gw)


DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
}


def _register(name: str, config: dict[str, Any]) -> None:
    @register_model(name)
    def _build(**overrides: Any) -> DiT:
        return DiT(**{**config, **overrides})

    _build.__doc__ = f"{name}: {config}"


for _name, _config in DIT_CONFIGS.items():
    _register(_name, _config)
