"""Search stage depths / width (/ FFN ratio) of a model family for a target (#params, Gflops).

The paper's Table 4 marks rows whose "depth and width were adjusted for a fair comparison" without giving the
shapes. This module finds *our own* adjustment: it enumerates shapes of a family (DiCo's U-shape with a given
token mixer, or the isotropic DiCo skeleton) and keeps those within a relative tolerance of both targets,
preferring the smallest change from the base shape. The chosen shapes are then written down (with the reason) in
:mod:`dico.models.ablation`; nothing here runs at import time of the models.

Counting is exact but cheap: a model's parameters and torchprofile MACs are affine in the stage depths,

    total(depths) = total(all depths 1) + sum_s (depths[s] - 1) * one_block(s),

so each (family, width, ratio) needs one base model and one block per distinct stage (width, resolution)
profiled -- not one profile per candidate. The base has one block per stage (not zero: a traced model drops the
condition embedder of an empty stage, which the counts of any real shape include), so depths start at 1.
:func:`exact_counts` re-counts a chosen shape on the whole model.

Run ``python -m dico.shape_search`` to print the search for every adjusted row (a few minutes on a CPU).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dico.profiling import count_macs, count_parameters, profile_macs

DICO_S_DEPTH = (5, 4, 4, 4, 4)


def meta_build(ctor: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """Build on the meta device and allocate without initialising (counts and MACs need no values)."""
    with torch.device("meta"):
        model = ctor(**kwargs)
    return model.to_empty(device="cpu")


def exact_counts(ctor: Callable[..., nn.Module], input_size: int = 32, **kwargs: Any) -> tuple[int, int]:
    """(parameters, torchprofile MACs at batch 1) of the whole model ``ctor(**kwargs)``."""
    model = meta_build(ctor, input_size=input_size, **kwargs)
    return count_parameters(model), count_macs(model, input_size, model.in_channels)


class _BlockProbe(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.block(x, c)


def block_counts(block: nn.Module, dim: int, size: int) -> tuple[int, int]:
    """(parameters, MACs) of one channels-last block on a (1, size, size, dim) map with a (1, dim) condition."""
    probe = _BlockProbe(block).eval()
    x, c = torch.randn(1, size, size, dim), torch.randn(1, dim)
    return count_parameters(block), profile_macs(probe, (x, c))


@dataclass
class Candidate:
    """A shape and its counts; errors are relative to the target."""

    hidden_size: int
    depth: tuple[int, ...] | int
    mlp_ratio: float
    params: int
    macs: int
    params_err: float
    gflops_err: float

    @property
    def max_err(self) -> float:
        return max(abs(self.params_err), abs(self.gflops_err))

    def kwargs(self) -> dict[str, Any]:
        depth = list(self.depth) if isinstance(self.depth, tuple) else self.depth
        return {"hidden_size": self.hidden_size, "depth": depth, "mlp_ratio": self.mlp_ratio}

    def __str__(self) -> str:
        return (
            f"hidden {self.hidden_size} depth {self.depth} ratio {self.mlp_ratio}: "
            f"{self.params / 1e6:.3f}M ({self.params_err:+.2%}), {self.macs / 1e9:.3f} G ({self.gflops_err:+.2%})"
        )


@dataclass
class SearchResult:
    target_params_M: float
    target_gflops: float
    feasible: list[Candidate] = field(default_factory=list)  # sorted, best first
    closest: Candidate | None = None  # smallest max error overall (feasible or not)

    @property
    def best(self) -> Candidate | None:
        return self.feasible[0] if self.feasible else None


def _rank(base_hidden: int, base_ratio: float, base_depth: Sequence[int] | int) -> Callable[[Candidate], tuple]:
    """Smallest change first: keep the FFN ratio (changed only if needed), then the width, then move the fewest
    blocks, then the smallest error; ties (enc2 <-> dec2 swaps) go to moves spread over stages."""

    def key(c: Candidate) -> tuple:
        pairs = [(c.depth, base_depth)] if isinstance(base_depth, int) else zip(c.depth, base_depth, strict=True)
        moves = [abs(a - b) for a, b in pairs]  # type: ignore[operator]
        # then spread the moves (sum of squares) rather than piling them on one stage
        return (abs(c.mlp_ratio - base_ratio), abs(c.hidden_size - base_hidden), sum(moves), c.max_err,
                sum(m * m for m in moves))  # fmt: skip

    return key


def _collect(
    totals: Iterable[tuple[int, tuple[int, ...] | int, float, int, int]],
    params_M: float,
    gflops: float,
    tol: float,
    key: Callable[[Candidate], tuple],
    keep: int,
) -> SearchResult:
    result = SearchResult(params_M, gflops)
    for hidden, depth, ratio, p, m in totals:
        cand = Candidate(hidden, depth, ratio, p, m, p / (params_M * 1e6) - 1, m / (gflops * 1e9) - 1)
        if result.closest is None or cand.max_err < result.closest.max_err:
            result.closest = cand
        if cand.max_err <= tol:
            result.feasible.append(cand)
    result.feasible.sort(key=key)
    del result.feasible[keep:]
    return result


def search_ushape(
    params_M: float,
    gflops: float,
    *,
    mixer: str = "conv",
    mixer_kwargs: dict[str, Any] | None = None,
    ffn_act: str = "gelu",
    widths: Iterable[int] = (128,),
    ratios: Iterable[float] = (2.0,),
    depth_range: Iterable[int] = range(1, 11),
    input_size: int = 32,
    tol: float = 0.01,
    base: tuple[int, float, Sequence[int]] = (128, 2.0, DICO_S_DEPTH),
    keep: int = 20,
) -> SearchResult:
    """Stage depths (5 ints from ``depth_range``) x width x FFN ratio of DiCo's U-shape with a given mixer."""
    from dico.models.blocks import DiCoBlock
    from dico.models.dico import DiCo
    from dico.models.mixers import ConvFFN, build_mixer

    depth_range = list(depth_range)
    if min(depth_range) < 1:
        raise ValueError("stage depths start at 1 (a stage without blocks is another architecture)")
    mk = dict(mixer_kwargs or {})

    def totals() -> Iterable[tuple[int, tuple[int, ...], float, int, int]]:
        for d, r in itertools.product(widths, ratios):
            p0, m0 = exact_counts(DiCo, input_size, hidden_size=d, depth=(1,) * 5, mlp_ratio=r, mixer=mixer,
                                  mixer_kwargs=mk, ffn_act=ffn_act)  # fmt: skip
            per_stage = []
            for dim, size in ((d, input_size), (2 * d, input_size // 2), (4 * d, input_size // 4),
                              (2 * d, input_size // 2), (2 * d, input_size)):  # fmt: skip
                with torch.device("meta"):
                    block = DiCoBlock(
                        dim, build_mixer(mixer, dim, 0, resolution=(size, size), **mk), ConvFFN(dim, r, ffn_act)
                    )
                per_stage.append(block_counts(block.to_empty(device="cpu"), dim, size))
            for depth in itertools.product(depth_range, repeat=5):
                p = p0 + sum((n - 1) * bp for n, (bp, _) in zip(depth, per_stage, strict=True))
                m = m0 + sum((n - 1) * bm for n, (_, bm) in zip(depth, per_stage, strict=True))
                yield d, depth, r, p, m

    return _collect(totals(), params_M, gflops, tol, _rank(*base), keep)


def search_isotropic(
    params_M: float,
    gflops: float,
    *,
    long_skips: int = 0,
    mixer: str = "conv",
    mixer_kwargs: dict[str, Any] | None = None,
    widths: Iterable[int] = (384,),
    ratios: Iterable[float] = (2.0,),
    depth_range: Iterable[int] = range(4, 41),
    patch_size: int = 2,
    input_size: int = 32,
    tol: float = 0.01,
    base: tuple[int, float, int] = (384, 2.0, 12),
    keep: int = 20,
) -> SearchResult:
    """Depth x width x FFN ratio of the isotropic DiCo skeleton (``long_skips`` fixed)."""
    from dico.models.blocks import DiCoBlock
    from dico.models.isotropic import IsotropicDiCo
    from dico.models.mixers import ConvFFN, build_mixer

    mk = dict(mixer_kwargs or {})
    grid = input_size // patch_size

    def totals() -> Iterable[tuple[int, int, float, int, int]]:
        for d, r in itertools.product(widths, ratios):
            common = dict(hidden_size=d, mlp_ratio=r, patch_size=patch_size, mixer=mixer, mixer_kwargs=mk)
            # the skips are part of the skeleton: count them with 2 * long_skips blocks (at least one), then add
            base_depth = max(1, 2 * long_skips)
            p0, m0 = exact_counts(IsotropicDiCo, input_size, depth=base_depth, long_skips=long_skips, **common)
            with torch.device("meta"):
                block = DiCoBlock(d, build_mixer(mixer, d, 0, resolution=(grid, grid), **mk), ConvFFN(d, r))
            bp, bm = block_counts(block.to_empty(device="cpu"), d, grid)
            for n in depth_range:
                if n >= base_depth:
                    yield d, n, r, p0 + (n - base_depth) * bp, m0 + (n - base_depth) * bm

    return _collect(totals(), params_M, gflops, tol, _rank(*base), keep)


def main() -> None:  # pragma: no cover - a report, run by hand
    """Print the search behind every adjusted shape recorded in :mod:`dico.models.ablation`."""
    from dico.models.ablation import SEARCHES

    for name, run in SEARCHES.items():
        result = run()
        print(f"== {name}: target {result.target_params_M}M / {result.target_gflops} G")
        for cand in result.feasible[:5]:
            print("   ", cand)
        if not result.feasible:
            print("    no shape within tolerance; closest:", result.closest)


if __name__ == "__main__":  # pragma: no cover
    main()
