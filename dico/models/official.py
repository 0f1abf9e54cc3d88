"""The published checkpoints' key names: the one place that knows them.

The key maps turn a state dict of the published DiCo (shallowdream204/DiCo) or DiT (facebookresearch/DiT) code
into ours; ``infer_arch`` / ``infer_config`` / ``registered_name`` tell which of our models the weights are, from
their keys and shapes alone; ``published_model`` builds it. Files (reading, formats, unwrapping a training
checkpoint) are :mod:`dico.checkpoints`' business.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .dico import DiCo
from .dit import DiT

# (published pattern, our replacement); applied in order, first match wins.
_DICO_BLOCK = {
    "conv1": "mixer.pw_in",
    "conv2": "mixer.dw",
    "conv3": "mixer.pw_out",
    "ca.1": "mixer.channel_attention.proj",
    "conv4": "ffn.fc1",
    "conv5": "ffn.fc2",
    "adaLN_modulation.1": "modulation.1",
}
_DICO_STAGES = {
    "encoder_level_1": "encoder1",
    "encoder_level_2": "encoder2",
    "latent": "middle",
    "decoder_level_2": "decoder2",
    "decoder_level_1": "decoder1",
}
DICO_KEY_MAP: list[tuple[str, str]] = [
    (r"^x_embedder\.proj\.", "stem."),
    *[(rf"^t_embedder_{i + 1}\.mlp\.", f"cond.{i}.timestep.mlp.") for i in range(3)],
    (r"^y_embedder\.embedding_table_([012])\.", r"cond.\1.label."),
    *[
        (rf"^{old}\.(\d+)\.{re.escape(part)}\.", rf"{new}.\1.{ours}.")
        for old, new in _DICO_STAGES.items()
        for part, ours in _DICO_BLOCK.items()
    ],
    (r"^down1_2\.body\.0\.", "down1.0."),
    (r"^down2_3\.body\.0\.", "down2.0."),
    (r"^up3_2\.body\.0\.", "up2.0."),
    (r"^up2_1\.body\.0\.", "up1.0."),
    (r"^reduce_chan_level2\.", "fuse2."),
    (r"^reduce_chan_level1\.", "fuse1."),
    (r"^final_layer\.out_proj\.", "head.proj."),
    (r"^final_layer\.adaLN_modulation\.1\.", "head.modulation.1."),
]

DIT_KEY_MAP: list[tuple[str, str]] = [
    (r"^x_embedder\.proj\.", "stem."),
    (r"^t_embedder\.mlp\.", "cond.0.timestep.mlp."),
    (r"^y_embedder\.embedding_table\.", "cond.0.label."),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1\.", r"blocks.\1.modulation.1."),
    (r"^blocks\.(\d+)\.attn\.", r"blocks.\1.mixer."),
    (r"^blocks\.(\d+)\.mlp\.", r"blocks.\1.ffn."),
    (r"^final_layer\.linear\.", "head.proj."),
    (r"^final_layer\.adaLN_modulation\.1\.", "head.modulation.1."),
]


# Our own DiT checkpoints written before DiT's blocks became the shared adaLN block (``DiCoBlock``): the block's
# attention was ``attn`` and its MLP ``mlp``; now they are its ``mixer`` and ``ffn``. Any prefix (``model.`` of
# a Lightning state dict, ``module.`` of the EMA copy) is kept.
PRE_SHARED_BLOCK_KEY_MAP: list[tuple[str, str]] = [
    (r"(^|\.)blocks\.(\d+)\.attn\.", r"\1blocks.\2.mixer."),
    (r"(^|\.)blocks\.(\d+)\.mlp\.", r"\1blocks.\2.ffn."),
]


def rename_pre_shared_block_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of ours (any prefix) with the DiT block keys of older dico versions renamed (see
    :data:`PRE_SHARED_BLOCK_KEY_MAP`); current keys come back unchanged, in the same order."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in PRE_SHARED_BLOCK_KEY_MAP:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out


def official_to_ours(key: str, arch: str) -> str:
    """Our name for a published key (DDP/compile prefixes removed). Unknown keys come back unchanged."""
    key = key.removeprefix("module.").removeprefix("_orig_mod.")
    for pattern, repl in DICO_KEY_MAP if _check_arch(arch) == "dico" else DIT_KEY_MAP:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_official_state_dict(state_dict: Mapping[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Rename every published key to ours."""
    return {official_to_ours(k, arch): v for k, v in state_dict.items()}


def _check_arch(arch: str) -> str:
    if arch not in ("dico", "dit"):
        raise ValueError(f"arch must be 'dico' or 'dit', got {arch!r}")
    return arch


def infer_config(state_dict: Mapping[str, Tensor], arch: str) -> dict[str, Any]:
    """Read the architecture (widths, depths, classes, patch size) off a published state dict.

    Label tables have one extra (null) row: the published models were all trained with label dropout.
    """
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if _check_arch(arch) == "dico":
        hidden = sd["x_embedder.proj.weight"].shape[0]
        in_channels = sd["x_embedder.proj.weight"].shape[1]
        depth = [
            1 + max([int(k.split(".")[1]) for k in sd if k.startswith(stage + ".")], default=-1)
            for stage in _DICO_STAGES
        ]
        n_table = sd["y_embedder.embedding_table_0.weight"].shape[0]
        out_channels = sd["final_layer.out_proj.weight"].shape[0]
        mlp_ratio = sd["encoder_level_1.0.conv4.weight"].shape[0] / hidden if depth[0] else 2.0
        return dict(
            hidden_size=hidden,
            depth=depth,
            mlp_ratio=mlp_ratio,
            in_channels=in_channels,
            learn_sigma=out_channels == 2 * in_channels,
            num_classes=n_table - 1,
        )
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_table = sd["y_embedder.embedding_table.weight"].shape[0]
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    config = dict(
        hidden_size=hidden,
        depth=depth,
        patch_size=patch,
        in_channels=in_channels,
        mlp_ratio=mlp_ratio,
        learn_sigma=out_channels == 2 * in_channels,
        num_classes=n_table - 1,
    )
    if "pos_embed" in sd:
        config["input_size"] = round(sd["pos_embed"].shape[1] ** 0.5) * patch
    return config


def infer_arch(state_dict: Mapping[str, Tensor]) -> str:
    """``"dico"`` or ``"dit"`` from the published key names (DDP/compile prefixes ignored)."""
    keys = {k.removeprefix("module.").removeprefix("_orig_mod.") for k in state_dict}
    if "t_embedder_1.mlp.0.weight" in keys or "y_embedder.embedding_table_0.weight" in keys:
        return "dico"
    if "y_embedder.embedding_table.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "dit"
    sample = sorted(keys)[:6]
    raise ValueError(
        f"these weights are neither a published DiCo nor a published DiT state dict (keys {sample} ...); "
        "pass the model name with --model if they are ours"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def registered_name(arch: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered model a published configuration is, and what differs from it.

    ``config`` is :func:`infer_config`'s output (plus ``num_heads`` for DiT). Returns ``(name, overrides)``
    with ``create_model(name, **overrides)`` the model of these weights: the named size when widths and depths
    match one (``DiCo-XL``, ``DiT-XL/2``; overrides then hold only e.g. ``input_size``), else the family's
    smallest name with every architecture argument overridden.
    """
    from .dico import DICO_CONFIGS
    from .dit import DIT_CONFIGS

    table = DICO_CONFIGS if _check_arch(arch) == "dico" else DIT_CONFIGS
    defaults = {"in_channels": 4, "learn_sigma": True, "num_classes": 1000, "input_size": 32}
    for name, named in table.items():
        if all(_same(config[k], v) for k, v in named.items() if k in config):
            overrides = {k: v for k, v in config.items() if k not in named and not _same(defaults.get(k), v)}
            return name, overrides
    name = next(iter(table))
    return name, {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def published_model(state_dict: Mapping[str, Tensor], arch: str, **config: Any) -> nn.Module:
    """Our model holding a published state dict of ``arch`` (a bare one: see :func:`dico.checkpoints.load_official`
    for files and training checkpoints). ``config`` overrides what is read off the weights (e.g. ``num_heads`` for
    DiT, which the weights do not reveal, ``input_size`` for DiCo)."""
    arch = _check_arch(arch)
    inferred = infer_config(state_dict, arch)
    if arch == "dit" and "num_heads" not in config:
        inferred["num_heads"] = published_dit_heads(inferred["hidden_size"])
    model: nn.Module = (DiCo if arch == "dico" else DiT)(**{**inferred, **config})
    return load_converted(model, state_dict, arch)


def load_converted(model: nn.Module, sd: Mapping[str, Tensor], arch: str) -> nn.Module:
    """Load published weights (a bare state dict of ``arch``) into one of our models, strictly: missing or
    unexpected keys raise a KeyError naming them, wrong shapes a ValueError."""
    converted = convert_official_state_dict(sd, arch)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(converted))
    unexpected = sorted(set(converted) - set(ours))
    if missing or unexpected:
        inverse = {official_to_ours(k, arch): k for k in sd}
        raise KeyError(
            f"published {arch} state dict does not match the model: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {[inverse.get(k, k) for k in unexpected[:10]]}{' ...' if len(unexpected) > 10 else ''}"
        )
    shapes = [(k, tuple(converted[k].shape), tuple(v.shape)) for k, v in ours.items() if converted[k].shape != v.shape]
    if shapes:
        raise ValueError(f"shape mismatch (key, published, ours): {shapes[:5]}")
    model.load_state_dict(converted)
    return model


#: Head counts of the published DiT sizes, by width; the weights themselves do not reveal it.
PUBLISHED_DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def published_dit_heads(hidden: int) -> int:
    """The head count of the published DiT of width ``hidden``; a ValueError for any other width."""
    if hidden not in PUBLISHED_DIT_HEADS:
        raise ValueError(f"a DiT of width {hidden} is not a published size; pass num_heads=... to load_official")
    return PUBLISHED_DIT_HEADS[hidden]
