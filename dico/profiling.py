"""Parameter and multiply-accumulate counts (the paper's "Gflops": torchprofile MACs of one forward).

A leaf: it counts any module and imports nothing of dico (``dico.models.info`` builds named models).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (DiT's fixed positions), as the published counts are."""
    return sum(p.numel() for p in model.parameters())


def _output_size(node: Any) -> int:
    return int(torch.Size(node.outputs[0].shape).numel())


#: Ops torchprofile does not know, counted as what they stand for: ``addcmul(a, b, c) = a + b * c`` is one multiply
#: per output element (the add is free, as torchprofile counts ``aten::add``), as the unfused ``b * c + a`` of the
#: published code is counted (``aten::mul``: its output size).
EXTRA_HANDLERS = {"aten::addcmul": _output_size}


def profile_macs(module: nn.Module, inputs: tuple[Any, ...]) -> int:
    """torchprofile's MAC count of ``module(*inputs)`` (one ``torch.jit`` trace), with :data:`EXTRA_HANDLERS`:
    the same as ``torchprofile.profile_macs`` for modules written without the fused ops."""
    try:
        from torchprofile.handlers import HANDLER_MAP
        from torchprofile.trace import trace
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MAC counting needs torchprofile>=0.1.0: pip install 'torchprofile>=0.1.0'") from e
    handlers = {**HANDLER_MAP, **EXTRA_HANDLERS}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the input checks become constants
        graph = trace(module, inputs)
    # ops without a handler (exp, pixel_shuffle, unbind, roll, ...) move data or are not multiply-accumulates
    return sum(handlers[n.operator](n) for n in graph.nodes if handlers.get(n.operator) is not None)


def count_macs(model: nn.Module, input_size: int, in_channels: int = 4, batch_size: int = 1) -> int:
    """MACs of ``model(x, t, y)`` (in eval mode) on a (batch, C, size, size) input: see :func:`profile_macs`."""
    x = torch.randn(batch_size, in_channels, input_size, input_size)
    t = torch.ones(batch_size, dtype=torch.long)
    y = torch.ones(batch_size, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        return profile_macs(model, (x, t, y))
    finally:
        model.train(was_training)
