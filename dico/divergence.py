"""The training loss and weight check, kept on the device between reads.

Reading a number off an accelerator waits for every queued kernel: one read per step would stall the pipeline every
step. :class:`DivergenceRecord` instead folds each checked step's verdict into device tensors (no host read) and is
read when the host waits anyway: at logging steps, before a checkpoint is written, at the end of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Divergence:
    """The first checked step whose loss was non-finite or whose weights were non-finite or too large."""

    step: int
    largest_abs_weight: float
    terms: dict[str, float]

    @property
    def loss_is_finite(self) -> bool:
        return math.isfinite(self.terms.get("loss", 0.0))


class DivergenceRecord:
    """Device-side record of the first diverged step among those observed since the last :meth:`read`."""

    def __init__(self) -> None:
        self._bad: Tensor | None = None  # () bool: a diverged step was observed
        self._row: Tensor | None = None  # (2 + terms,) float64: step, max |w|, loss terms of that step
        self._names: list[str] = []

    def observe(self, step: int, terms: dict[str, Tensor], params: Iterable[Tensor], max_abs_weight: float) -> None:
        """Fold in one step: its loss terms (scalars) and the weights of its forward. No host-device sync."""
        weights = [p.detach() for p in params if p.is_floating_point() and p.numel()]
        largest = torch.stack(torch._foreach_norm(weights, float("inf"))).max().double()
        loss = terms["loss"].detach()
        sound = torch.isfinite(largest) & torch.isfinite(loss)
        if max_abs_weight > 0:
            sound = sound & (largest <= max_abs_weight)
        # new_full fills on the device: a host scalar copied there would wait for the queue
        row = torch.stack([largest.new_full((), float(step)), largest, *(v.detach().double() for v in terms.values())])
        if self._bad is None or self._row is None or self._row.shape != row.shape:
            self._bad, self._row, self._names = ~sound, row, list(terms)
            return
        self._row = torch.where(self._bad, self._row, row)  # the first diverged step's row stays
        self._bad = self._bad | ~sound

    def read(self) -> Divergence | None:
        """The first diverged step observed since the last read, if any (one host-device sync); then forget."""
        if self._bad is None or self._row is None:
            return None
        values = torch.cat([self._bad.double().view(1), self._row]).tolist()
        names, self._bad, self._row = self._names, None, None
        if not values[0]:
            return None
        return Divergence(int(values[1]), values[2], dict(zip(names, values[3:], strict=True)))
