"""DiT (Peebles & Xie, 2023): the isotropic transformer baseline with adaLN-Zero, patch 2.

Its blocks are :class:`~dico.models.blocks.DiCoBlock` with :class:`~dico.models.attention.SelfAttention2d` as the
mixer (the self-attention ablation rows use the same two) and a Linear MLP as the FFN.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .attention import SelfAttention2d
from .blocks import DiCoBlock
from .isotropic import IsotropicBackbone
from .registry import register_configs


class MLP(nn.Module):
    """Linear -> act -> Linear on tokens."""

    def __init__(self, dim: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def dit_block(dim: int, num_heads: int, mlp_ratio: float = 4.0) -> DiCoBlock:
    """DiT's transformer block: the adaLN-Zero block with multi-head self-attention over every token as the mixer
    and a token MLP (tanh GELU) as the FFN. (Before the blocks were shared, its keys were ``attn.``/``mlp.``;
    :data:`~dico.models.official.PRE_SHARED_BLOCK_KEY_MAP` renames those.)"""
    mixer = SelfAttention2d(dim, num_heads=num_heads)
    return DiCoBlock(dim, mixer, MLP(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh")))


class DiT(IsotropicBackbone):
    """Patchify (p x p conv) + fixed sin-cos positions -> ``depth`` DiT blocks -> modulated norm -> linear ->
    unpatchify: the isotropic skeleton (:class:`~dico.models.isotropic.IsotropicBackbone`) with transformer blocks.

    ``skeleton``: ``patch_size``, ``long_skips`` > 0 for U-ViT long skips (the "iso.&skip" skeleton of the
    ablation) and the keywords of :class:`~dico.models.base.DiffusionBackbone`.
    """

    def __init__(
        self, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, **skeleton: Any
    ) -> None:
        blocks = [dit_block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        super().__init__(blocks, hidden_size=hidden_size, positions=True, **skeleton)


DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
}


register_configs(DiT, DIT_CONFIGS)
