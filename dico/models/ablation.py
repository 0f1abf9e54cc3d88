"""Every row of the paper's ablation Tables 3 and 4 as a named, registered model variant.

One table of pure data: :data:`VARIANTS` (registry name -> :class:`Variant`: constructor, keyword arguments,
note, our recorded counts, how its shape was chosen, any departure from the row's family), and the two paper
tables as (paper row -> registry name); :data:`ABLATION_ROWS` joins them. Each variant is a registry name built
from swappable parts -- a skeleton (DiCo's U-shape, DiT, or the isotropic DiCo skeleton), a
token mixer, a channel attention, an activation -- never a copy of a model file::

    from dico.models import create_model
    from dico.models.ablation import ABLATION_ROWS, TABLE4

    row = ABLATION_ROWS[TABLE4, "CM->Window Attn"]
    model = create_model(row.model)                         # the full-size variant
    smoke = create_model(row.model, **row.tiny_overrides())  # a CPU-sized one of the same family

Shapes. The paper gives no shapes for the rows it marks "depth and width adjusted" (Table 4) nor for the
isotropic DiCo (Table 3). The shapes below are OURS, chosen by :mod:`dico.shape_search` (which imports this
table; ``python -m dico.shape_search`` reprints the searches): within 1% of the paper's #params and Gflops,
preferring DiCo-S's FFN ratio, then its width, then the fewest blocks moved from (5, 4, 4, 4, 4). They are never
claimed to be the authors'. ``Variant.shape`` states each choice and its reason, ``Variant.deviation`` any knob
outside "depths and width" that had to move (every variant is within 1% of the paper's counts).

Counts are parameters (frozen ones included) and torchprofile 0.1.0 MACs of one forward on 1x4x32x32.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from torch import nn

from .dico import DICO_CONFIGS, DiCo
from .dit import DIT_CONFIGS, DiT
from .isotropic import IsotropicDiCo
from .registry import MODELS, register_model

TABLE3 = "table3_architecture_ablation_small_400k"
TABLE4 = "table4_component_ablation_small_400k"

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"DiCo": DiCo, "DiT": DiT, "IsotropicDiCo": IsotropicDiCo}


@dataclass(frozen=True)
class Variant:
    """A registered model variant: ``ARCHITECTURES[arch](**kwargs)``.

    ``params``/``macs`` are our exact counts at 32x32 (checked by the tests); ``shape`` says where the shape
    comes from ("published", or our search and its reason); ``adjusted``: the paper adjusted depth/width of
    this row for equal counts (or gives no shape), so its shape is searched, at full size and at any reduced
    size (:mod:`dico.shape_search`); ``deviation``: a knob outside depths and width that had to move; ``tiny``:
    overrides giving a CPU-sized model of the same family (hidden 16, 16x16 input) for unit tests.
    """

    name: str
    arch: str
    kwargs: Mapping[str, Any]
    note: str
    params: int
    macs: int
    shape: str = "published"
    adjusted: bool = False
    deviation: str = ""
    tiny: Mapping[str, Any] = field(default_factory=dict)

    def build(self, **overrides: Any) -> nn.Module:
        return ARCHITECTURES[self.arch](**merge_overrides(self.kwargs, overrides))

    def tiny_overrides(self) -> dict[str, Any]:
        """Overrides for :func:`~dico.models.create_model` giving a small model of this variant's family."""
        return dict(self.tiny)


@dataclass(frozen=True)
class AblationRow:
    """One row of a paper table and the variant that reproduces it."""

    table: str
    row: str
    model: str  # registry name

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.model]

    @property
    def kwargs(self) -> Mapping[str, Any]:
        return self.variant.kwargs

    @property
    def note(self) -> str:
        return self.variant.note

    @property
    def deviation(self) -> str:
        return self.variant.deviation

    @property
    def paper(self) -> dict[str, Any]:
        """The paper's entry for this row (#params, Gflops, throughput, FID, IS, precision, recall)."""
        return paper_row(self.table, self.row)

    def tiny_overrides(self) -> dict[str, Any]:
        return self.variant.tiny_overrides()


def merge_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{**config, **overrides}``, except that ``mixer_kwargs`` are merged key by key (so an override such as
    ``mixer_kwargs={"window_size": 4}`` keeps the variant's other mixer settings)."""
    out = {**config, **overrides}
    if "mixer_kwargs" in overrides and "mixer_kwargs" in config:
        out["mixer_kwargs"] = {**(config["mixer_kwargs"] or {}), **(overrides["mixer_kwargs"] or {})}
    return out


DICO_S = DICO_CONFIGS["DiCo-S"]
DIT_S2 = DIT_CONFIGS["DiT-S/2"]

# Small models of each family for CPU smoke runs: hidden 16 on 16x16 latents (stages at 16, 8 and 4), two blocks
# in the outer stages so that window attention's shifted blocks are exercised, windows and agents that fit.
_TINY_DICO = dict(hidden_size=16, depth=(2, 1, 1, 1, 2), input_size=16, num_classes=10)
_TINY_ISO = dict(hidden_size=16, depth=4, input_size=16, num_classes=10)
_TINY_DIT = dict(hidden_size=32, depth=4, num_heads=2, input_size=16, num_classes=10)


def _dico(mixer: str = "conv", mixer_kwargs: Mapping[str, Any] | None = None, **shape: Any) -> dict[str, Any]:
    config = {**DICO_S, **shape, "mixer": mixer}
    if mixer_kwargs:
        config["mixer_kwargs"] = dict(mixer_kwargs)
    return config


def _tiny_dico(**mixer_kwargs: Any) -> dict[str, Any]:
    """Tiny overrides; ``mixer_kwargs`` merge into the variant's own (see :func:`merge_overrides`)."""
    return {**_TINY_DICO, "mixer_kwargs": mixer_kwargs} if mixer_kwargs else dict(_TINY_DICO)


# The isotropic DiCo shape (both Table 3 rows): the paper's iso -> iso&skip step (+1.4M, +0.37 G) is exactly five
# Linear(768 -> 384) skips on 16x16 tokens, as for DiT-S/2, so the width is 384; depth 10 and FFN ratio 6.5 are
# the search's answer for both rows at once (see SHAPE_CHOICES).
_ISO = dict(hidden_size=384, depth=10, mlp_ratio=6.5, patch_size=2)
# DiT (U-shape) == CM->Self-Attn (identical numbers in the paper): DiCo-S's U-shape and FFN with self-attention.
_SELF_ATTN = _dico("self_attention", {"head_dim": 56}, hidden_size=112, depth=(1, 6, 6, 7, 1))

_VARIANT_LIST = [
    # ---- Table 3: skeletons -------------------------------------------------------------------------------------
    Variant(
        name="DiT-S/2",
        arch="DiT",
        kwargs=dict(DIT_S2),
        note="DiT-S/2 as published (isotropic, no skips).",
        params=32_963_360,
        macs=6_060_491_010,
        tiny=_TINY_DIT,
    ),
    Variant(
        name="DiT-S/2-skip",
        arch="DiT",
        kwargs={**DIT_S2, "long_skips": 5},
        note="DiT-S/2 with U-ViT long skips: the outputs of blocks 1-5 join the inputs of blocks 12-8 (Linear 2C->C).",
        params=34_439_840,
        macs=6_437_978_370,
        shape="DiT-S/2 + 5 long skips",
        tiny={**_TINY_DIT, "long_skips": 2},
    ),
    Variant(
        name="DiCo-iso",
        arch="IsotropicDiCo",
        kwargs=dict(_ISO),
        note="DiCo blocks (conv module + CCA, GELU FFN) in DiT-S/2's isotropic skeleton, width 384 on 16x16 tokens; "
        "depth 10 and FFN ratio 6.5 are our search's shape, not the authors'.",
        params=33_487_520,
        macs=5_691_756_546,
        shape=(
            "ours: width 384, depth 10, FFN ratio 6.5; width 384 from the paper's iso -> iso&skip step (five "
            "Linear(768->384) on 16x16 tokens); depth and FFN ratio by search, the one shape within 1% of "
            "both isotropic DiCo rows"
        ),
        adjusted=True,
        deviation=(
            "FFN ratio 6.5 instead of DiCo's 2 (or DiT's 4): with ratio <= 4 no width/depth of the isotropic "
            "DiCo reaches 33.7M and 5.67 G together (closest: width 320, depth 20, ratio 4: +5.9% params, "
            "-6.8% Gflops; ratio 2 at width 384 needs 17 blocks for 33.7M but gives only 3.9 G)"
        ),
        tiny=_TINY_ISO,
    ),
    Variant(
        name="DiCo-iso-skip",
        arch="IsotropicDiCo",
        kwargs={**_ISO, "long_skips": 5},
        note="DiCo-iso plus five U-ViT long skips (Linear 2C->C), as DiT-S/2-skip.",
        params=34_964_000,
        macs=6_069_243_906,
        shape="ours: DiCo-iso + 5 long skips",
        adjusted=True,
        deviation="FFN ratio 6.5, as DiCo-iso",
        tiny={**_TINY_ISO, "long_skips": 2},
    ),
    Variant(
        name="DiT-U",
        arch="DiCo",
        kwargs=dict(_SELF_ATTN),
        note="DiCo's U-shaped skeleton with global multi-head self-attention as every token mixer (DiCo's FFN, "
        "ratio 2): the same model as CM->Self-Attn. Width 112 and depths (1, 6, 6, 7, 1) are our search's shape.",
        params=33_267_032,
        macs=4_267_693_568,
        shape=(
            "ours: width 112, depths (1, 6, 6, 7, 1); global attention at 32x32 is too costly for any depths "
            ">= 1 at width 128 (closest (2, 1, 5, 4, 1): -1.6% params, +1.8% Gflops); the nearest width "
            "(multiples of 16) within 1% is 112"
        ),
        adjusted=True,
        deviation="width 112 instead of 128 (depths alone cannot reach 4.23 G with global attention at 32x32)",
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S",
        arch="DiCo",
        kwargs=dict(DICO_S),
        note="DiCo-S as published (U-shape, conv module with CCA, 3x3 DWC, GELU).",
        params=33_137_672,
        macs=4_248_541_568,
        tiny=_tiny_dico(),
    ),
    # ---- Table 4, rows the paper did not adjust: DiCo-S's shape -----------------------------------------------
    Variant(
        name="DiCo-S-ReLU",
        arch="DiCo",
        kwargs={**_dico("conv", {"act": "relu"}), "ffn_act": "relu"},
        note="Every GELU of DiCo-S (conv module and FFN) replaced by ReLU.",
        params=33_137_672,
        macs=4_248_541_568,
        shape="DiCo-S",
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S-DWC5",
        arch="DiCo",
        kwargs=_dico("conv", {"kernel_size": 5}),
        note="DiCo-S with 5x5 depthwise convolutions in the conv modules.",
        params=33_229_832,
        macs=4_286_290_304,
        shape="DiCo-S",
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S-DWC7",
        arch="DiCo",
        kwargs=_dico("conv", {"kernel_size": 7}),
        note="DiCo-S with 7x7 depthwise convolutions in the conv modules.",
        params=33_368_072,
        macs=4_342_913_408,
        shape="DiCo-S",
        tiny=_tiny_dico(),
    ),
    # ---- Table 4, adjusted rows: our shapes (SHAPE_CHOICES) -------------------------------------------------------
    Variant(
        name="DiCo-S-noCCA",
        arch="DiCo",
        kwargs=_dico("conv", {"channel_attention": "none"}, depth=(6, 3, 5, 3, 4)),
        note="Conv modules without channel attention; depths (6, 3, 5, 3, 4) are our adjustment.",
        params=32_987_144,
        macs=4_245_570_304,
        shape=(
            "ours: depths (6, 3, 5, 3, 4), fewest blocks moved from DiCo-S's (5, 4, 4, 4, 4) at width 128, FFN ratio 2"
        ),
        adjusted=True,
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S-SE",
        arch="DiCo",
        kwargs=_dico("conv", {"channel_attention": "se"}, depth=(3, 5, 4, 5, 4)),
        note="CCA replaced by squeeze-and-excitation (GAP, C -> C/16 -> C, sigmoid); depths (3, 5, 4, 5, 4) are "
        "our adjustment.",
        params=32_658_304,
        macs=4_245_631_616,
        shape=(
            "ours: depths (3, 5, 4, 5, 4), fewest blocks moved from DiCo-S's (5, 4, 4, 4, 4) at width 128, FFN ratio 2"
        ),
        adjusted=True,
        tiny=_tiny_dico(channel_attention_kwargs={"reduction": 4}),  # C/16 = 1 unit at width 16 can die (ReLU)
    ),
    Variant(
        name="DiCo-S-ChannelSA",
        arch="DiCo",
        kwargs=_dico("conv", {"channel_attention": "channel_self_attention"}, depth=(2, 2, 4, 3, 2)),
        note="CCA replaced by Restormer's MDTA channel self-attention (head dim 64, no biases); depths "
        "(2, 2, 4, 3, 2) are our adjustment.",
        params=32_929_096,
        macs=4_286_563_085,
        shape=(
            "ours: depths (2, 2, 4, 3, 2), fewest blocks moved from DiCo-S's (5, 4, 4, 4, 4) at width 128, FFN ratio 2"
        ),
        adjusted=True,
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S-SelfAttn",
        arch="DiCo",
        kwargs=dict(_SELF_ATTN),
        note="Conv modules replaced by global multi-head self-attention (head dim 56): the same model as DiT-U.",
        params=33_267_032,
        macs=4_267_693_568,
        shape=(
            "= DiT-U; ours: width 112, depths (1, 6, 6, 7, 1); global attention at 32x32 is too costly for "
            "any depths >= 1 at width 128 (closest (2, 1, 5, 4, 1): -1.6% params, +1.8% Gflops); the nearest "
            "width (multiples of 16) within 1% is 112"
        ),
        adjusted=True,
        deviation="width 112 instead of 128 (depths alone cannot reach 4.23 G with global attention at 32x32)",
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S-WindowAttn",
        arch="DiCo",
        kwargs=_dico("window_attention", {"window_size": 8}, depth=(4, 4, 4, 4, 2)),
        note="Conv modules replaced by Swin window attention (8x8 windows, odd blocks shifted by 4 with the mask, "
        "relative position bias, head dim 32); depths (4, 4, 4, 4, 2) are our adjustment.",
        params=32_966_056,
        macs=4_336_960_328,
        shape=(
            "ours: depths (4, 4, 4, 4, 2), fewest blocks moved from DiCo-S's (5, 4, 4, 4, 4) at width 128, FFN ratio 2"
        ),
        adjusted=True,
        tiny=_tiny_dico(window_size=4),
    ),
    Variant(
        name="DiCo-S-FLatten",
        arch="DiCo",
        kwargs=_dico("focused_linear_attention", {"focusing_factor": 3, "kernel_size": 5}, depth=(7, 2, 4, 3, 2)),
        note="Conv modules replaced by FLatten focused linear attention over each stage (p = 3, 5x5 DWC on v, "
        "learned positions on k, head dim 32); depths (7, 2, 4, 3, 2) are our adjustment.",
        params=32_780_936,
        macs=4_293_612_982,
        shape=(
            "ours: depths (7, 2, 4, 3, 2), fewest blocks moved from DiCo-S's (5, 4, 4, 4, 4) at width 128, FFN ratio 2"
        ),
        adjusted=True,
        tiny=_tiny_dico(),
    ),
    Variant(
        name="DiCo-S-AgentAttn",
        arch="DiCo",
        kwargs=_dico("agent_attention", {"agent_num": 49}, depth=(7, 3, 4, 4, 1)),
        note="Conv modules replaced by agent attention over each stage (49 = 7x7 pooled agents, position biases, "
        "3x3 DWC on v, head dim 32); depths (7, 3, 4, 4, 1) are our adjustment.",
        params=33_082_304,
        macs=4_234_854_054,
        shape=(
            "ours: depths (7, 3, 4, 4, 1), fewest blocks moved from DiCo-S's (5, 4, 4, 4, 4) at width 128, FFN ratio 2"
        ),
        adjusted=True,
        tiny=_tiny_dico(agent_num=4),
    ),
]

VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANT_LIST}

_TABLE3_ROWS = {
    "DiT (iso.)": "DiT-S/2",
    "DiCo (iso.)": "DiCo-iso",
    "DiT (iso.&skip)": "DiT-S/2-skip",
    "DiCo (iso.&skip)": "DiCo-iso-skip",
    "DiT (U-shape)": "DiT-U",
    "DiCo (U-shape)": "DiCo-S",
}
_TABLE4_ROWS = {
    "DiCo-S": "DiCo-S",
    "GELU->ReLU": "DiCo-S-ReLU",
    "3x3->5x5 DWC": "DiCo-S-DWC5",
    "3x3->7x7 DWC": "DiCo-S-DWC7",
    "w/o CCA": "DiCo-S-noCCA",
    "CCA->SE module": "DiCo-S-SE",
    "CCA->Channel Self-Attn": "DiCo-S-ChannelSA",
    "CM->Self-Attn": "DiCo-S-SelfAttn",
    "CM->Window Attn": "DiCo-S-WindowAttn",
    "CM->Focused Linear Attn": "DiCo-S-FLatten",
    "CM->Agent Attn": "DiCo-S-AgentAttn",
}
#: (table key of paper_tables.json, paper row name) -> the row's variant.
ABLATION_ROWS: dict[tuple[str, str], AblationRow] = {
    **{(TABLE3, row): AblationRow(TABLE3, row, name) for row, name in _TABLE3_ROWS.items()},
    **{(TABLE4, row): AblationRow(TABLE4, row, name) for row, name in _TABLE4_ROWS.items()},
}


def _register(variant: Variant) -> None:
    @register_model(variant.name)
    def _build(**overrides: Any) -> nn.Module:
        return variant.build(**overrides)

    _build.__doc__ = f"{variant.name}: {variant.note}"


for _variant in _VARIANT_LIST:
    if _variant.name not in MODELS:  # DiCo-S and DiT-S/2 are registered by their own modules
        _register(_variant)


@functools.cache
def paper_tables() -> dict[str, Any]:
    """The paper's tables as packaged with dico (``dico/reference/paper_tables.json``)."""
    return json.loads(resources.files("dico").joinpath("reference/paper_tables.json").read_text())


def paper_row(table: str, row: str) -> dict[str, Any]:
    """The paper's entry (#params, Gflops, FID, ...) for a row of Table 3 or 4."""
    rows = paper_tables()[table]
    for entry in rows["rows"] if isinstance(rows, dict) else rows:
        if entry["row"] == row:
            return entry
    raise KeyError(f"no row {row!r} in {table}")


__all__ = [
    "ABLATION_ROWS",
    "TABLE3",
    "TABLE4",
    "VARIANTS",
    "AblationRow",
    "Variant",
    "merge_overrides",
    "paper_row",
    "paper_tables",
]
