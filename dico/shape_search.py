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
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dico.models.ablation import ABLATION_ROWS, TABLE3, TABLE4, VARIANTS, paper_row
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
        return (
            abs(c.mlp_ratio - base_ratio),
            abs(c.hidden_size - base_hidden),
            sum(moves),
            c.max_err,
            sum(m * m for m in moves),
        )

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
    **fixed: Any,
) -> SearchResult:
    """Stage depths (5 ints from ``depth_range``) x width x FFN ratio of DiCo's U-shape with a given mixer;
    ``fixed``: other constructor arguments (``in_channels``, ``num_classes``)."""
    from dico.models.blocks import DiCoBlock
    from dico.models.dico import DiCo
    from dico.models.mixers import ConvFFN, build_mixer

    depth_range = list(depth_range)
    if min(depth_range) < 1:
        raise ValueError("stage depths start at 1 (a stage without blocks is another architecture)")
    mk = dict(mixer_kwargs or {})

    def totals() -> Iterable[tuple[int, tuple[int, ...], float, int, int]]:
        for d, r in itertools.product(widths, ratios):
            p0, m0 = exact_counts(
                DiCo,
                input_size,
                hidden_size=d,
                depth=(1,) * 5,
                mlp_ratio=r,
                mixer=mixer,
                mixer_kwargs=mk,
                ffn_act=ffn_act,
                **fixed,
            )
            per_stage = []
            for dim, size in (
                (d, input_size),
                (2 * d, input_size // 2),
                (4 * d, input_size // 4),
                (2 * d, input_size // 2),
                (2 * d, input_size),
            ):
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
    **fixed: Any,
) -> SearchResult:
    """Depth x width x FFN ratio of the isotropic DiCo skeleton (``long_skips`` fixed); ``fixed``: other
    constructor arguments (``in_channels``, ``num_classes``)."""
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
            p0, m0 = exact_counts(IsotropicDiCo, input_size, depth=base_depth, long_skips=long_skips, **common, **fixed)
            with torch.device("meta"):
                block = DiCoBlock(d, build_mixer(mixer, d, 0, resolution=(grid, grid), **mk), ConvFFN(d, r))
            bp, bm = block_counts(block.to_empty(device="cpu"), d, grid)
            for n in depth_range:
                if n >= base_depth:
                    yield d, n, r, p0 + (n - base_depth) * bp, m0 + (n - base_depth) * bm

    return _collect(totals(), params_M, gflops, tol, _rank(*base), keep)


def _paper_search(kind: Callable[..., SearchResult], table: str, row: str, **kwargs: Any) -> Callable[[], SearchResult]:
    def run() -> SearchResult:
        ref = paper_row(table, row)
        return kind(ref["params_M"], ref["gflops"], **kwargs)

    return run


_ISO_RATIOS = tuple(r / 2 for r in range(4, 17))  # 2, 2.5, ..., 8

#: The searches behind the shapes of the adjusted variants (``Variant.shape``), by registry name.
SEARCHES: dict[str, Callable[[], SearchResult]] = {
    "DiCo-S-noCCA": _paper_search(search_ushape, TABLE4, "w/o CCA", mixer_kwargs={"channel_attention": "none"}),
    "DiCo-S-SE": _paper_search(search_ushape, TABLE4, "CCA->SE module", mixer_kwargs={"channel_attention": "se"}),
    "DiCo-S-ChannelSA": _paper_search(
        search_ushape, TABLE4, "CCA->Channel Self-Attn", mixer_kwargs={"channel_attention": "channel_self_attention"}
    ),
    # heads do not change the counts: head_dim 16 lets every width of the grid split into heads
    "DiT-U": _paper_search(
        search_ushape,
        TABLE4,
        "CM->Self-Attn",
        mixer="self_attention",
        mixer_kwargs={"head_dim": 16},
        widths=range(64, 193, 16),
        depth_range=range(1, 13),
    ),
    "DiCo-S-WindowAttn": _paper_search(
        search_ushape, TABLE4, "CM->Window Attn", mixer="window_attention", mixer_kwargs={"window_size": 8}
    ),
    "DiCo-S-FLatten": _paper_search(search_ushape, TABLE4, "CM->Focused Linear Attn", mixer="focused_linear_attention"),
    "DiCo-S-AgentAttn": _paper_search(
        search_ushape, TABLE4, "CM->Agent Attn", mixer="agent_attention", mixer_kwargs={"agent_num": 49}
    ),
    "DiCo-iso": _paper_search(search_isotropic, TABLE3, "DiCo (iso.)", widths=(384,), ratios=_ISO_RATIOS),
    "DiCo-iso-skip": _paper_search(
        search_isotropic, TABLE3, "DiCo (iso.&skip)", long_skips=5, widths=(384,), ratios=_ISO_RATIOS
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Reduced-size rows: one scaling rule per small dataset (which ablation budget trains by which: ablations/budgets.py)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProxyRule:
    """A scaling rule from the full-size rows (32x32x4 latents, 1000 classes) to a small dataset.

    Widths (and attention head dims) shrink by ``width_divisor``; the input becomes ``data`` (``in_channels``,
    ``input_size``, ``num_classes``), so every stage resolution shrinks by ``spatial_divisor`` (32 /
    ``input_size``) and window sizes and agent grids shrink with it (same fraction of the stage); kernel sizes,
    head counts, FFN ratios, SE's reduction and stage depths stay. Rows whose depths the paper adjusted for equal
    counts (``Variant.adjusted``) are re-adjusted at the reduced size by the same search, targeting the paper's
    #params and Gflops *ratios* to DiCo-S (both tables' reference row) times the reduced DiCo-S's counts."""

    width_divisor: int
    data: Mapping[str, int]
    description: str

    @property
    def spatial_divisor(self) -> int:
        return FULL_SIZE // self.data["input_size"]


FULL_SIZE = 32  # the latent resolution of the paper's ablations (ImageNet 256 through the f8 VAE)
#: The digits rule: 8x8x1 digits, stage maps 8, 4, 2 (window 8 -> 2, 49 agents -> 4).
DIGITS_RULE = ProxyRule(4, {"in_channels": 1, "input_size": 8, "num_classes": 10}, "8x8 digits")
#: The crops rule: 16x16x1 crops of scikit-image's images (dico.data.image_crops), stage maps 16, 8, 4 as the full
#: size's 32, 16, 8 halved: window 8 -> 4 (16 tokens, 1/16 of the first stage as at full size), 49 agents -> 16.
CROPS16_RULE = ProxyRule(4, {"in_channels": 1, "input_size": 16, "num_classes": 10}, "16x16 image crops")
REFERENCE_ROW = (TABLE4, "DiCo-S")
#: head_dim defaults of the attention mixers (their constructors') when a variant does not set one
_HEAD_DIM_DEFAULTS = {
    "self_attention": 64,
    "window_attention": 32,
    "focused_linear_attention": 32,
    "agent_attention": 32,
}


def _scaled_mixer_kwargs(mixer: str, mixer_kwargs: Mapping[str, Any], rule: ProxyRule = DIGITS_RULE) -> dict[str, Any]:
    mk = dict(mixer_kwargs)
    k, s = rule.width_divisor, rule.spatial_divisor
    if mixer in _HEAD_DIM_DEFAULTS:
        mk["head_dim"] = mk.get("head_dim", _HEAD_DIM_DEFAULTS[mixer]) // k
    if "window_size" in mk:
        mk["window_size"] = max(1, mk["window_size"] // s)
    if "agent_num" in mk:
        pool = max(1, round(math.isqrt(mk["agent_num"]) / s))
        mk["agent_num"], mk["bias_grid"] = pool * pool, pool
    if mk.get("channel_attention") == "channel_self_attention":
        cak = dict(mk.get("channel_attention_kwargs") or {})
        cak["head_dim"] = cak.get("head_dim", 64) // k
        mk["channel_attention_kwargs"] = cak
    return mk


def scaled_overrides(name: str, rule: ProxyRule = DIGITS_RULE) -> dict[str, Any]:
    """The rule without the depth re-adjustment: ``create_model(name, **scaled_overrides(name))``."""
    v = VARIANTS[name]
    kw = dict(v.kwargs)
    out: dict[str, Any] = {**rule.data, "hidden_size": kw["hidden_size"] // rule.width_divisor}
    if v.arch == "DiT":
        return out  # heads stay (head dim shrinks with the width)
    mk = _scaled_mixer_kwargs(kw.get("mixer", "conv"), kw.get("mixer_kwargs") or {}, rule)
    if mk:
        out["mixer_kwargs"] = mk
    return out


@dataclass
class ProxyShape:
    """A reduced-size row: overrides for ``create_model(name, **overrides)`` and its counts against the rule's
    targets (``None`` for rows whose shape is not adjusted)."""

    name: str
    overrides: dict[str, Any]
    params: int
    macs: int
    target_params: float | None
    target_macs: float | None

    @property
    def errors(self) -> tuple[float, float] | None:
        if self.target_params is None or self.target_macs is None:
            return None
        return self.params / self.target_params - 1, self.macs / self.target_macs - 1


def _counts(name: str, overrides: Mapping[str, Any]) -> tuple[int, int]:
    from dico.models import create_model

    return exact_counts(lambda **kw: create_model(name, **kw), **overrides)


def proxy_shape(name: str, tol: float = 0.03, rule: ProxyRule = DIGITS_RULE) -> ProxyShape:
    """The reduced-size row of variant ``name`` by ``rule`` (:class:`ProxyRule`)."""
    v = VARIANTS[name]
    overrides = scaled_overrides(name, rule)
    if not v.adjusted:
        return ProxyShape(name, overrides, *_counts(name, overrides), None, None)
    ref_table, ref_row = REFERENCE_ROW
    ref, row = paper_row(ref_table, ref_row), paper_row(*_paper_key(name))
    ref_p, ref_m = _counts(ref_row, scaled_overrides(ref_row, rule))
    target_p, target_m = ref_p * row["params_M"] / ref["params_M"], ref_m * row["gflops"] / ref["gflops"]
    kw, width = dict(v.kwargs), overrides["hidden_size"]
    fixed = {"in_channels": rule.data["in_channels"], "num_classes": rule.data["num_classes"]}
    common = dict(
        mixer=kw.get("mixer", "conv"),
        mixer_kwargs=overrides.get("mixer_kwargs"),
        widths=(width,),
        input_size=rule.data["input_size"],
        tol=tol,
        **fixed,
    )
    if v.arch == "IsotropicDiCo":
        ratio = kw.get("mlp_ratio", 2.0)
        result = search_isotropic(
            target_p / 1e6,
            target_m / 1e9,
            long_skips=kw.get("long_skips", 0),
            ratios=_ISO_RATIOS,
            depth_range=range(1, 41),
            patch_size=kw.get("patch_size", 2),
            base=(width, ratio, kw["depth"]),
            **common,
        )
    else:
        result = search_ushape(
            target_p / 1e6,
            target_m / 1e9,
            ffn_act=kw.get("ffn_act", "gelu"),
            ratios=(kw.get("mlp_ratio", 2.0),),
            depth_range=range(1, 11),
            base=(width, kw.get("mlp_ratio", 2.0), tuple(kw["depth"])),
            **common,
        )
    best = result.best or result.closest
    assert best is not None
    overrides.update(depth=best.kwargs()["depth"], mlp_ratio=best.mlp_ratio)
    return ProxyShape(name, overrides, best.params, best.macs, target_p, target_m)


def _paper_key(name: str) -> tuple[str, str]:
    """The paper row of a variant (the first, for a variant in both tables)."""
    return next((r.table, r.row) for r in ABLATION_ROWS.values() if r.model == name)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a report, run by hand
    """Print the search behind every adjusted shape (``--proxy``: the reduced-size rows instead)."""
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, description=main.__doc__)
    parser.add_argument("--proxy", action="store_true", help="print the reduced-size rows of the digits rule")
    if parser.parse_args(argv).proxy:
        for name in VARIANTS:
            shape = proxy_shape(name)
            err = "" if shape.errors is None else " (vs target: {:+.1%} params, {:+.1%} MACs)".format(*shape.errors)
            print(f"{name}: {shape.overrides} -> {shape.params:,} params, {shape.macs:,} MACs{err}")
        return
    for name, run in SEARCHES.items():
        result = run()
        print(f"== {name}: target {result.target_params_M}M / {result.target_gflops} G")
        for cand in result.feasible[:5]:
            print("   ", cand)
        if not result.feasible:
            print("    no shape within tolerance; closest:", result.closest)


if __name__ == "__main__":  # pragma: no cover
    main()
