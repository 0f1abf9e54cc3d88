"""Tolerances for comparing two floating-point computations of the same quantity, from the dtype, the magnitude of
the values and the depth of the computation -- not from what one machine's kernels happened to produce.

Two correct implementations (another op order, another CPU's vector kernels: ``ATEN_CPU_CAPABILITY=default|avx2``)
differ by rounding. Each layer of a network adds a few units in the last place (ulp) of the values it produces,
relative to their scale; reductions over ``n`` terms add about ``sqrt(n)`` more. Without cancellation the
difference of the outputs stays within ``ulps_per_layer * layers * eps * scale``, ``scale`` being the largest
magnitude of the reference. Elements much smaller than the scale inherit the scale's absolute error, so the bound
is absolute (a relative bound per element fails on outputs that pass near zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

ULPS_PER_LAYER = 64  # headroom for reductions over a few thousand terms (sqrt(4096) = 64) in every layer


def tolerance(expected: Tensor, layers: int = 1, dtype: torch.dtype | None = None) -> float:
    """Absolute tolerance for a ``layers``-deep computation whose exact result is about ``expected``."""
    eps = torch.finfo(dtype or expected.dtype).eps
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return ULPS_PER_LAYER * max(layers, 1) * eps * max(scale, torch.finfo(torch.float32).tiny)


def assert_close(actual: Tensor, expected: Tensor, layers: int = 1, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to the rounding of a ``layers``-deep computation in their dtype."""
    atol = tolerance(expected, layers)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg)
