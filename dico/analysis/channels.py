"""Channel activations (the paper's Figs. 5 and 7): how many channels of a block's token mixer carry signal.

The activation score of a channel is ReLU, then global average pooling, of the last block's mixer output
(DiCo: the conv module ``pw_in -> dw -> act -> channel_attention -> pw_out``; DiT: the attention), averaged
over the batch. Sorted and normalised by the largest, they show how evenly a model uses its channels; DiCo
without compact channel attention (CCA) has many near-silent channels, DiCo with CCA and DiT fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dico.models.dico import DiCo
from dico.models.dit import DiT


@torch.no_grad()
def capture_output(model: nn.Module, module: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """Run ``model(*args, **kwargs)`` and return what ``module`` (a submodule) output in that forward.

    The hook only records (it returns nothing, so the model's outputs are unchanged) and is removed afterwards.
    If ``module`` runs more than once, the last output is returned. The output is copied when it is seen, so
    that what later layers do to it cannot change the record.
    """
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        model(*args, **kwargs)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} did not run in the forward pass")
    return seen[-1]


def last_mixer(model: nn.Module) -> nn.Module:
    """The token mixer of the model's last block: DiCo's ``blocks()[-1].mixer``, DiT's ``blocks[-1].mixer``."""
    if isinstance(model, DiCo):
        return model.blocks()[-1].mixer
    if isinstance(model, DiT):
        return model.blocks[-1].mixer
    blocks = getattr(model, "blocks", None)
    if callable(blocks):  # other U-shaped/isotropic skeletons built from DiCoBlocks
        return blocks()[-1].mixer
    raise TypeError(f"no known last mixer for {type(model).__name__}")


def activation_scores(features: Tensor) -> Tensor:
    """ReLU then global average pooling over every axis but the last (channels): (..., C) -> (C,)."""
    return features.relu().flatten(0, -2).float().mean(0)


def channel_activation_scores(model: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """Activation score per channel (C,) of the last block's mixer output for inputs ``(x, t, y)``.

    Both backbones keep their mixer outputs channels-last -- DiCo (B, H, W, C), DiT tokens (B, N, C) -- so the
    scores pool over batch and positions. Non-negative by construction.
    """
    was_training = model.training
    model.eval()
    try:
        return activation_scores(capture_output(model, last_mixer(model), x, t, y))
    finally:
        model.train(was_training)


def sorted_normalised(scores: Tensor) -> Tensor:
    """Scores in descending order, divided by the largest (so the curve starts at 1)."""
    s = scores.detach().float().sort(descending=True).values
    return s / s[0].clamp_min(torch.finfo(s.dtype).tiny)


def inactive_fraction(scores: Tensor, threshold: float = 0.1) -> float:
    """Fraction of channels whose score is below ``threshold`` times the largest score."""
    return float((sorted_normalised(scores) < threshold).float().mean())


def first_stage_features(model: DiCo, x: Tensor, t: Tensor, y: Tensor, where: str = "mixer") -> Tensor:
    """Features of DiCo's first stage (encoder1's last block) as (B, C, H, W).

    ``where="mixer"``: that block's conv-module output (after channel attention and the output 1x1);
    ``"attention"``: the channel attention's output (what CCA reweighted, before the output 1x1);
    ``"block"``: the block's output (residual stream).
    """
    if not isinstance(model, DiCo):
        raise TypeError(f"first-stage features are defined for DiCo's U-shape, got {type(model).__name__}")
    block = model.encoder1[-1]
    modules: dict[str, Callable[[], nn.Module]] = {
        "mixer": lambda: block.mixer,
        "attention": lambda: block.mixer.channel_attention,
        "block": lambda: block,
    }
    if where not in modules:
        raise ValueError(f"where must be one of {sorted(modules)}, got {where!r}")
    was_training = model.training
    model.eval()
    try:
        out = capture_output(model, modules[where](), x, t, y)
    finally:
        model.train(was_training)
    return out.permute(0, 3, 1, 2)


__all__ = [
    "activation_scores",
    "capture_output",
    "channel_activation_scores",
    "first_stage_features",
    "inactive_fraction",
    "last_mixer",
    "sorted_normalised",
]
