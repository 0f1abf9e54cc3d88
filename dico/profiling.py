"""Parameter and multiply-accumulate counts (the paper's "Gflops": torchprofile MACs of one forward).

A leaf: it counts any ``model(x, t, y)`` and imports nothing of dico (``dico.models.info`` builds named models).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (DiT's fixed positions), as the published counts are."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_channels: int = 4, batch_size: int = 1) -> int:
    """torchprofile multiply-accumulates of ``model(x, t, y)`` on a (batch, C, size, size) input."""
    try:
        from torchprofile import profile_macs
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MAC counting needs torchprofile>=0.1.0: pip install 'torchprofile>=0.1.0'") from e
    x = torch.randn(batch_size, in_channels, input_size, input_size)
    t = torch.ones(batch_size, dtype=torch.long)
    y = torch.ones(batch_size, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no handlers" for zero-cost ops (exp, pixel_shuffle, unbind)
            return int(profile_macs(model, (x, t, y)))
    finally:
        model.train(was_training)
