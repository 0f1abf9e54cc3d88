"""Attention token mixers for the component ablation (Table 4, "CM -> ..."): channels-last (B, H, W, C) maps in
and out, registered in ``TOKEN_MIXERS`` beside DiCo's conv module.

Each follows its paper's published definition (written here from the papers and their reference code, not copied):

* ``self_attention``: multi-head softmax attention over every token of the stage (DiT's attention, no positions).
* ``window_attention``: Swin's (shifted) window attention with a relative position bias table; blocks with an odd
  ``block_index`` shift the windows by half a window and mask the wrapped-around tokens.
* ``focused_linear_attention``: FLatten's focused linear attention: ReLU kernel divided by a learned (softplus)
  scale, focusing power p (norm-preserving ``x**p``), linear attention with its normaliser, a depthwise conv on v
  (shared by the heads) and a learned positional term added to k.
* ``agent_attention``: Agent Attention: pooled agent tokens aggregate keys/values with one softmax and broadcast
  them back to the queries with another, each with its position biases; plus a depthwise 3x3 conv on v.

The resolution-dependent parameters (FLatten's positions, the agents' row/column biases) are sized for the stage
resolution the model passes as ``resolution``; other input sizes interpolate them.

Attention products use ``F.scaled_dot_product_attention`` or matmuls so that MAC counters see them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import SpatialConv, resolve_heads
from .registry import TOKEN_MIXERS


def _as_pair(resolution: int | tuple[int, int] | None, what: str) -> tuple[int, int]:
    if resolution is None:
        raise ValueError(
            f"{what} has resolution-dependent parameters and needs the stage resolution: pass resolution=(H, W) "
            "(DiCo and the isotropic skeleton pass it to the mixers that accept it)"
        )
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _heads_first(x: Tensor, heads: int) -> Tensor:
    """(B, ..., C) tokens -> (B, heads, N, C / heads)."""
    b, c = x.shape[0], x.shape[-1]
    return x.reshape(b, -1, heads, c // heads).transpose(1, 2)


def _heads_last(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, heads, N, d) -> channels-last ``shape`` (B, H, W, heads * d)."""
    return x.transpose(1, 2).reshape(shape)


@TOKEN_MIXERS.register("self_attention")
class SelfAttention2d(nn.Module):
    """Multi-head self-attention over all H*W tokens of a channels-last map (fused qkv, output projection).

    Without positions of its own it is equivariant to permutations of the tokens; in the U-shaped skeleton the
    convolutional stem and resamplers are the only source of position.
    """

    def __init__(
        self, dim: int, *, block_index: int = 0, num_heads: int | None = None, head_dim: int = 64, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = resolve_heads(dim, num_heads, head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads_first(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_heads_last(F.scaled_dot_product_attention(q, k, v), x.shape))


@lru_cache(maxsize=32)
def relative_position_index(window: int, table_window: int) -> Tensor:
    """(window^2, window^2) indices into a (2 * table_window - 1)^2 relative-position table, row-major offsets.

    ``window`` may be smaller than ``table_window`` (a map smaller than a window): the same offset reads the
    same entry of the table. Built on the CPU (cached), whatever the default device.
    """
    r = torch.arange(window, device="cpu")
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # (2, N, N), in [0, 2 * table_window - 2]
    # rel[0] * (2w - 1) + rel[1], written as an add so that MAC counters tracing the first (uncached) call see no
    # multiplication: the counts must not depend on what is already cached
    return torch.add(rel[1], rel[0], alpha=2 * table_window - 1)


@lru_cache(maxsize=32)
def shifted_window_mask(height: int, width: int, window: int, shift: int) -> Tensor:
    """Swin's additive mask (num_windows, window^2, window^2) for cyclically shifted windows: 0 between tokens of
    the same region, -100 between tokens that only share a window because of the wrap-around."""
    labels = torch.zeros(height, width, device="cpu")
    count = 0
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in bands:
        for ws in bands:
            labels[hs, ws] = count
            count += 1
    windows = labels.view(height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1, window**2)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differ.shape, device="cpu").masked_fill(differ, -100.0)


@TOKEN_MIXERS.register("window_attention")
class WindowAttention2d(nn.Module):
    """Swin (shifted) window attention on a channels-last map.

    The map is cut into non-overlapping ``window_size`` x ``window_size`` windows; each window attends within
    itself with a learned relative position bias (one (2w-1)^2 table per head). With ``shift`` on, blocks with an
    odd ``block_index`` roll the map by ``-window_size // 2`` first (and back after) and mask token pairs that
    only meet through the roll's wrap-around, so information crosses window borders every other block.

    As in Swin, a map no larger than a window is one unshifted window; otherwise the window must divide H and W
    (checked at construction when the model passes the stage ``resolution``, and at every forward).
    """

    def __init__(
        self,
        dim: int,
        *,
        block_index: int = 0,
        resolution: int | tuple[int, int] | None = None,
        window_size: int = 8,
        shift: bool = True,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.window_size = window_size
        self.shift_size = window_size // 2 if (shift and block_index % 2 == 1) else 0
        if resolution is not None:  # fail at construction, not at the first forward
            self.windowing(*_as_pair(resolution, "window attention"))
        self.num_heads = resolve_heads(dim, num_heads, head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def windowing(self, height: int, width: int) -> tuple[int, int]:
        """(window, shift) used on a height x width map; raises a ValueError when the window does not tile it."""
        window, shift = self.window_size, self.shift_size
        if min(height, width) <= window:  # Swin: the whole (smaller) map is one window, never shifted
            window, shift = min(height, width), 0
        if height % window or width % window:
            raise ValueError(
                f"window attention: window size {window} must divide the stage resolution {height}x{width}; "
                "choose a window_size that divides every stage's resolution (or an input size that fits it)"
            )
        return window, shift

    def position_bias(self, window: int) -> Tensor:
        """(heads, window^2, window^2) relative position bias."""
        table = self.relative_position_bias_table
        index = relative_position_index(window, self.window_size).to(table.device)
        return table[index].permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        window, shift = self.windowing(h, w)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        nh, nw = h // window, w // window
        # (B, H, W, C) -> (B, windows, window^2, C)
        tokens = x.reshape(b, nh, window, nw, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * nw, window**2, c)
        heads = self.num_heads
        # each (B, windows, heads, window^2, d)
        q, k, v = (
            t.reshape(b, nh * nw, window**2, heads, c // heads).transpose(2, 3) for t in self.qkv(tokens).chunk(3, -1)
        )
        bias = self.position_bias(window)  # (heads, N, N), broadcast over batch and windows
        if shift:
            bias = bias + shifted_window_mask(h, w, window, shift).to(bias.device)[:, None]  # (windows, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.transpose(2, 3).reshape(b, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return self.proj(out)


def _resize_map(p: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize the last two dims of a (..., H, W) parameter (identity when the size already fits)."""
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    lead = p.shape[:-2]
    out = F.interpolate(p.reshape(1, -1, *p.shape[-2:]), size=size, mode=mode, align_corners=False)
    return out.reshape(*lead, *size)


def focus(x: Tensor, power: float) -> Tensor:
    """FLatten's focusing function on non-negative features: ``x**p`` rescaled to keep the norm of ``x``.

    Computed in at least float32: the powers of the 1e-6 floor would underflow in half precision.
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xp = xf**power
    return (xp * (xf.norm(dim=-1, keepdim=True) / xp.norm(dim=-1, keepdim=True))).to(x.dtype)


@TOKEN_MIXERS.register("focused_linear_attention")
class FocusedLinearAttention2d(nn.Module):
    """FLatten focused linear attention over all tokens of the stage.

    phi(t) = focus((ReLU(t) + 1e-6) / softplus(s)), per-channel learned s; k gets a learned positional term first.
    Each head computes ``phi(q) (phi(k)^T v) / (phi(q) . sum phi(k))`` -- linear in the number of tokens --
    and adds a depthwise ``kernel_size`` conv of its v (one conv shared by all heads, as published).
    """

    def __init__(
        self,
        dim: int,
        *,
        block_index: int = 0,
        resolution: int | tuple[int, int] | None = None,
        focusing_factor: float = 3.0,
        kernel_size: int = 5,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.resolution = _as_pair(resolution, "focused linear attention")
        self.num_heads = resolve_heads(dim, num_heads, head_dim)
        self.focusing_factor = focusing_factor
        d = dim // self.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(dim))
        self.positional_encoding = nn.Parameter(torch.zeros(*self.resolution, dim))  # channels-last (H, W, C)

    def feature_map(self, t: Tensor) -> Tensor:
        return focus((F.relu(t) + 1e-6) / F.softplus(self.scale), self.focusing_factor)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        pos = _resize_map(self.positional_encoding.permute(2, 0, 1), (h, w), "bicubic").permute(1, 2, 0)
        q, k = self.feature_map(q), self.feature_map(k + pos)
        q, k, vh = (_heads_first(t, heads) for t in (q, k, v))  # (B, heads, N, d)
        n = h * w
        normaliser = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6  # (B, heads, N, 1)
        kv = (k.transpose(-2, -1) @ vh) / n  # (B, heads, d, d)
        out = _heads_last((q @ kv) / normaliser, x.shape)
        # depthwise conv of v, each head's d channels through the same (d -> d, groups=d) kernel
        vmap = v.reshape(b, h, w, heads, d).permute(0, 3, 4, 1, 2).reshape(b * heads, d, h, w)
        out = out + self.dwc(vmap).reshape(b, heads * d, h, w).permute(0, 2, 3, 1)
        return self.proj(out)


@TOKEN_MIXERS.register("agent_attention")
class AgentAttention2d(nn.Module):
    """Agent attention over all tokens of the stage.

    ``agent_num`` (a perfect square n^2) agent tokens are the n x n average pool of the queries. Agents first
    attend to the keys (softmax, agent-to-token position bias) to aggregate values; every query then attends to
    the agents (softmax, token-to-agent position bias) to receive them. Biases: a 7 x 7 map per head and agent
    interpolated to the stage, plus per-row and per-column terms; a depthwise 3x3 conv of v is added.
    """

    def __init__(
        self,
        dim: int,
        *,
        block_index: int = 0,
        resolution: int | tuple[int, int] | None = None,
        agent_num: int = 49,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        bias_grid: int = 7,
    ) -> None:
        super().__init__()
        pool = math.isqrt(agent_num)
        if agent_num < 1 or pool * pool != agent_num:
            raise ValueError(f"agent_num must be a perfect square (the agents are an n x n pool), got {agent_num}")
        self.resolution = _as_pair(resolution, "agent attention")
        self.agent_num, self.pool_size = agent_num, pool
        heads = self.num_heads = resolve_heads(dim, num_heads, head_dim)
        h, w = self.resolution
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = SpatialConv(dim, dim, 3, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(heads, agent_num, bias_grid, bias_grid))  # agent -> token
        self.na_bias = nn.Parameter(torch.zeros(heads, agent_num, bias_grid, bias_grid))  # token -> agent
        self.ah_bias = nn.Parameter(torch.zeros(heads, agent_num, h, 1))
        self.aw_bias = nn.Parameter(torch.zeros(heads, agent_num, 1, w))
        self.ha_bias = nn.Parameter(torch.zeros(heads, agent_num, h, 1))
        self.wa_bias = nn.Parameter(torch.zeros(heads, agent_num, 1, w))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            nn.init.trunc_normal_(p, std=0.02)

    def biases(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Agent->token (heads, A, N) and token->agent (heads, N, A) position biases on an h x w map."""
        heads, a = self.num_heads, self.agent_num
        grid = _resize_map(self.an_bias, (h, w)) + _resize_map(self.ah_bias, (h, 1)) + _resize_map(self.aw_bias, (1, w))
        back = _resize_map(self.na_bias, (h, w)) + _resize_map(self.ha_bias, (h, 1)) + _resize_map(self.wa_bias, (1, w))
        return grid.reshape(heads, a, h * w), back.reshape(heads, a, h * w).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        heads = self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        agents = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), self.pool_size).flatten(2).transpose(1, 2)  # (B, A, C)
        qh, kh, vh, ah = (_heads_first(t, heads) for t in (q, k, v, agents))
        to_agents, to_tokens = self.biases(h, w)
        agent_v = F.scaled_dot_product_attention(ah, kh, vh, attn_mask=to_agents.to(q.dtype))  # (B, heads, A, d)
        out = F.scaled_dot_product_attention(qh, ah, agent_v, attn_mask=to_tokens.to(q.dtype))  # (B, heads, N, d)
        return self.proj(_heads_last(out, x.shape) + self.dwc(v))


__all__ = [
    "AgentAttention2d",
    "FocusedLinearAttention2d",
    "SelfAttention2d",
    "WindowAttention2d",
    "focus",
    "relative_position_index",
    "shifted_window_mask",
]
