"""Attention locality of DiT (the paper's Fig. 4): capture every block's attention probabilities with forward
hooks and measure how much of each token's attention stays near it.

The hooks recompute ``softmax(Q K^T / sqrt(d))`` from the input of each block's attention
(:class:`~dico.models.attention.SelfAttention2d`; the model itself calls the fused
``F.scaled_dot_product_attention``, which never materialises the probabilities); the model's code and outputs
are left as they are.

Token ``i`` of a ``grid = (H, W)`` token map sits at row ``i // W``, column ``i % W`` (DiT's patch order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dico.models.attention import SelfAttention2d
from dico.models.dit import DiT

METRICS = ("euclidean", "chebyshev")


def attention_probabilities(attn: SelfAttention2d, x: Tensor) -> Tensor:
    """The probabilities (B, heads, N, N) that ``attn`` applies to tokens ``x`` (B, N, C) or to a channels-last
    token grid (B, h, w, C) (DiT's blocks, token n at row n // w); rows sum to 1."""
    x = x.flatten(1, -2)
    b, n, c = x.shape
    h = attn.num_heads
    q, k, _ = attn.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    scores = (q.float() @ k.float().transpose(-2, -1)) * (c // h) ** -0.5
    return scores.softmax(dim=-1)


def attention_modules(model: nn.Module) -> list[SelfAttention2d]:
    """Every DiT block's attention, in order (``model.blocks[i].mixer``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not all(
        isinstance(getattr(b, "mixer", None), SelfAttention2d) for b in blocks
    ):
        raise TypeError(f"expected a DiT (blocks[i].mixer = SelfAttention2d), got {type(model).__name__}")
    return [block.mixer for block in blocks]


class AttentionRecorder:
    """Context manager recording the attention probabilities of every DiT block in forward passes.

    ``maps[i]`` is the last forward's map of block ``i``: (B, N, N) averaged over heads, or (B, heads, N, N)
    with ``average_heads=False``. The hooks return nothing (the model's outputs are untouched) and are removed
    on exit.
    """

    def __init__(self, model: nn.Module, average_heads: bool = True) -> None:
        self.modules = attention_modules(model)
        self.average_heads = average_heads
        self.maps: list[Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def _hook(self, index: int) -> Any:
        def hook(module: SelfAttention2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            with torch.no_grad():
                probs = attention_probabilities(module, inputs[0])
            self.maps[index] = (probs.mean(1) if self.average_heads else probs).cpu()

        return hook

    def __enter__(self) -> AttentionRecorder:
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def stacked(self) -> Tensor:
        """(layers, B, [heads,] N, N) of the last forward."""
        if any(m is None for m in self.maps):
            raise RuntimeError("no forward pass was recorded")
        return torch.stack(self.maps)  # type: ignore[arg-type]


@torch.no_grad()
def capture_attention(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, average_heads: bool = True) -> Tensor:
    """Attention probabilities of every block for one forward: (layers, B, [heads,] N, N)."""
    with AttentionRecorder(model, average_heads) as recorder:
        model(x, t, y)
    return recorder.stacked()


def token_grid(model: DiT) -> tuple[int, int]:
    """The (H, W) token grid of a DiT at its ``input_size``."""
    side = model.input_size // model.patch_size
    return side, side


def token_distances(grid: tuple[int, int], metric: str = "euclidean") -> Tensor:
    """(N, N) distances, in tokens, between the grid positions of every pair of tokens."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1).double()  # (N, 2)
    delta = (pos[:, None] - pos[None]).abs()
    return delta.norm(dim=-1) if metric == "euclidean" else delta.amax(dim=-1)


def locality_score(
    attn: Tensor,
    grid: tuple[int, int],
    radius: float,
    metric: str = "euclidean",
    anchors: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Attention mass within ``radius`` tokens of the anchor, averaged over anchors.

    ``attn`` (..., N, N): row ``a`` is anchor ``a``'s attention over the N = H * W tokens. Returns a tensor of
    shape ``attn.shape[:-2]`` (e.g. per layer and sample): the mean over ``anchors`` (default: every token) of
    the probability mass on tokens at distance <= ``radius`` (the anchor itself included).
    """
    n = grid[0] * grid[1]
    if attn.shape[-1] != n or attn.shape[-2] != n:
        raise ValueError(f"attention of shape {tuple(attn.shape)} does not fit a {grid[0]}x{grid[1]} token grid")
    near = (token_distances(grid, metric) <= radius + 1e-9).to(attn.dtype)  # (N, N)
    mass = (attn * near.to(attn.device)).sum(-1)  # (..., N): per anchor
    if anchors is not None:
        mass = mass[..., torch.as_tensor(anchors, dtype=torch.long, device=mass.device)]
    return mass.mean(-1)


def uniform_locality(grid: tuple[int, int], radius: float, metric: str = "euclidean") -> float:
    """The locality score of attention spread evenly over every token (the no-locality baseline)."""
    n = grid[0] * grid[1]
    return float(locality_score(torch.full((n, n), 1.0 / n, dtype=torch.float64), grid, radius, metric))


def anchor_map(attn: Tensor, grid: tuple[int, int], anchor: int) -> Tensor:
    """Anchor token's attention (..., N, N) -> (..., H, W) map over the grid."""
    return attn[..., anchor, :].reshape(*attn.shape[:-2], *grid)


def grid_index(grid: tuple[int, int], row: int, col: int) -> int:
    """Token index of grid position (row, col)."""
    return row * grid[1] + col


@dataclass
class AttentionRecord:
    """Attention recorded while sampling: ``maps[t]`` is (layers, B, [heads,] N, N) at model timestep ``t``."""

    maps: dict[int, Tensor]
    samples: Tensor
    grid: tuple[int, int]
    timesteps: list[int] = field(default_factory=list)

    def stacked(self) -> Tensor:
        """(timesteps, layers, B, [heads,] N, N), timesteps in sampling order (noisy first)."""
        return torch.stack([self.maps[t] for t in self.timesteps])


@torch.no_grad()
def attention_along_sampling(
    model: DiT,
    labels: Tensor | Sequence[int],
    *,
    steps: int = 50,
    num_records: int = 5,
    sampler: str = "ddim",
    seed: int = 0,
    cfg_scale: float = 1.0,
    clip_denoised: bool = False,
    average_heads: bool = True,
) -> AttentionRecord:
    """Sample ``labels`` with ``model`` and record every block's attention at ``num_records`` of the ``steps``
    sampling steps (evenly spaced, from pure noise to the last step).

    Sampling gives inputs of the right statistics at every noise level without any data (e.g. for a released
    ImageNet checkpoint). With ``cfg_scale`` != 1 the conditional half of the guided batch is recorded.
    """
    from dico.diffusion import generate, sampling_diffusion

    if sampler not in ("ddim", "iddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'iddpm' (one model call per step), got {sampler!r}")
    num_records = max(1, min(num_records, steps))
    wanted = {int(i) for i in np.linspace(0, steps - 1, num_records).round()}
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    b = len(labels)
    maps: dict[int, Tensor] = {}
    order: list[int] = []
    calls = 0

    def net(x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        nonlocal calls
        index, calls = calls, calls + 1
        if index not in wanted:
            return model(x, t, *args, **kwargs)
        with AttentionRecorder(model, average_heads) as recorder:
            out = model(x, t, *args, **kwargs)
        timestep = int(t[0])
        maps[timestep] = recorder.stacked()[:, :b]
        order.append(timestep)
        return out

    was_training = model.training
    model.eval()
    try:
        samples = generate(
            net,
            labels,
            (model.in_channels, model.input_size, model.input_size),
            model.null_label,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            clip_denoised=clip_denoised,
            diffusion=sampling_diffusion(sampler, steps, learn_sigma=model.learn_sigma),
        )
    finally:
        model.train(was_training)
    return AttentionRecord(maps=maps, samples=samples, grid=token_grid(model), timesteps=order)


@dataclass
class LocalitySummary:
    """Locality of a DiT's attention (see :func:`summarise_locality`)."""

    radius: float
    metric: str
    grid: tuple[int, int]
    timesteps: list[int]
    per_layer_timestep: Tensor  # (timesteps, layers), averaged over anchors, samples (and heads)
    uniform: float  # the same score for uniform attention

    @property
    def score(self) -> float:
        """The one number: attention mass within the radius, averaged over anchors, layers and timesteps."""
        return float(self.per_layer_timestep.mean())

    @property
    def per_layer(self) -> Tensor:
        return self.per_layer_timestep.mean(0)

    @property
    def per_timestep(self) -> Tensor:
        return self.per_layer_timestep.mean(1)


def summarise_locality(record: AttentionRecord, radius: float, metric: str = "euclidean") -> LocalitySummary:
    """Locality scores of recorded attention, per (timestep, layer), with the uniform-attention baseline."""
    maps = record.stacked()  # (T, L, B, [heads,] N, N)
    scores = locality_score(maps, record.grid, radius, metric)  # (T, L, B[, heads])
    per = scores.flatten(2).mean(-1)
    return LocalitySummary(
        radius, metric, record.grid, list(record.timesteps), per, uniform_locality(record.grid, radius, metric)
    )


def locality_curve(
    record: AttentionRecord, radii: Iterable[float], metric: str = "euclidean"
) -> tuple[list[float], list[float], list[float]]:
    """(radii, scores, uniform baselines): the overall score as the radius grows."""
    radii = list(radii)
    scores = [summarise_locality(record, r, metric).score for r in radii]
    return radii, scores, [uniform_locality(record.grid, r, metric) for r in radii]


__all__ = [
    "AttentionRecord",
    "AttentionRecorder",
    "LocalitySummary",
    "anchor_map",
    "attention_along_sampling",
    "attention_modules",
    "attention_probabilities",
    "capture_attention",
    "grid_index",
    "locality_curve",
    "locality_score",
    "summarise_locality",
    "token_distances",
    "token_grid",
    "uniform_locality",
]
