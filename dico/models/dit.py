"""DiT (Peebles & Xie, 2023): the isotropic transformer baseline with adaLN-Zero, patch 2."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .isotropic import IsotropicBackbone
from .layers import AdaLNModulation, channel_norm, gated_residual, modulate
from .registry import register_configs


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over all tokens of a channels-last map (B, ..., C) with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(1, -2)  # (B, N, C)
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


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
    """Transformer block with adaLN-Zero conditioning on a channels-last token grid (B, h, w, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = channel_norm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = channel_norm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))
        self.modulation = AdaLNModulation(dim, dim, 6)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = gated_residual(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        return gated_residual(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class DiT(IsotropicBackbone):
    """Patchify (p x p conv) + fixed sin-cos positions -> ``depth`` DiT blocks -> modulated norm -> linear ->
    unpatchify: the isotropic skeleton (:class:`~dico.models.isotropic.IsotropicBackbone`) with transformer blocks.

    ``skeleton``: ``patch_size``, ``long_skips`` > 0 for U-ViT long skips (the "iso.&skip" skeleton of the
    ablation) and the keywords of :class:`~dico.models.base.DiffusionBackbone`.
    """

    def __init__(
        self, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, **skeleton: Any
    ) -> None:
        blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        super().__init__(blocks, hidden_size=hidden_size, positions=True, **skeleton)


DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
}


register_configs(DiT, DIT_CONFIGS)
