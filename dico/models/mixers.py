"""Token mixers and feed-forward networks for 2-D blocks: channels-last (B, H, W, C) -> (B, H, W, C).

A token mixer is any module registered in ``TOKEN_MIXERS`` whose constructor takes
``(dim, *, block_index=0, **kwargs)``; the block index lets e.g. window attention alternate shifts. Mixers
with resolution-sized parameters also take ``resolution=(H, W)``, which the models pass (see :func:`build_mixer`).
DiCo's mixer is :class:`ConvModule`; the ablation registers attention mixers beside it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from .layers import PointwiseConv, SpatialConv, activation
from .registry import CHANNEL_ATTENTION, TOKEN_MIXERS


@TOKEN_MIXERS.register("conv")
class ConvModule(nn.Module):
    """DiCo's conv module: 1x1 -> kxk depthwise -> act -> channel attention -> 1x1."""

    def __init__(
        self,
        dim: int,
        *,
        block_index: int = 0,
        kernel_size: int = 3,
        act: str = "gelu",
        channel_attention: str = "cca",
        channel_attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.pw_in = PointwiseConv(dim, dim)
        self.dw = SpatialConv(dim, dim, kernel_size, groups=dim)
        self.act = activation(act)
        self.channel_attention = CHANNEL_ATTENTION.build(channel_attention, dim, **(channel_attention_kwargs or {}))
        self.pw_out = PointwiseConv(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw_out(self.channel_attention(self.act(self.dw(self.pw_in(x)))))


class ConvFFN(nn.Module):
    """Pointwise feed-forward network on a feature map: 1x1 (C -> rC) -> act -> 1x1 (rC -> C)."""

    def __init__(self, dim: int, ratio: float = 2.0, act: str = "gelu") -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = PointwiseConv(dim, hidden)
        self.act = activation(act)
        self.fc2 = PointwiseConv(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def accepts_keyword(fn: Any, name: str) -> bool:
    """Whether a constructor/function takes the keyword argument ``name`` (explicitly, not through **kwargs)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def build_mixer(
    name: str, dim: int, block_index: int = 0, resolution: tuple[int, int] | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered token mixer by name (see the module docstring for the interface).

    ``resolution`` (the stage's (H, W)) is passed on only to mixers whose constructor takes a ``resolution``
    keyword (those with resolution-sized parameters, e.g. learned positions); an explicit
    ``kwargs["resolution"]`` wins.
    """
    ctor = TOKEN_MIXERS.get(name)
    if resolution is not None and "resolution" not in kwargs and accepts_keyword(ctor, "resolution"):
        kwargs["resolution"] = resolution
    return ctor(dim, block_index=block_index, **kwargs)
