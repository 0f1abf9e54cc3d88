"""The training loss and weight check, kept on the device between reads.

Reading a number off an accelerator waits for every queued kernel: one read per step would stall the pipeline every
step. :class:`DivergenceRecord` instead folds each checked step's verdict into device tensors (no host read) and is
read when the host waits anyway: at logging steps, before a checkpoint is written, at the end of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def weights_are_sound(state_dict: Mapping[str, Tensor], max_abs_weight: float, prefix: str = "model.") -> bool:
    """Whether every floating tensor under ``prefix`` is finite and within ``max_abs_weight`` (0: no bound)."""
    return within_limit(largest_abs_weight(state_dict, prefix), max_abs_weight)


def largest_abs_weight(state_dict: Mapping[str, Tensor], prefix: str = "model.") -> float:
    """max |w| over the floating tensors under ``prefix`` (NaN if any is NaN); one device sync."""
    tensors = [v.detach() for k, v in state_dict.items() if k.startswith(prefix) and v.is_floating_point()]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return 0.0
    return torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))]).max().item()


def within_limit(largest: float, max_abs_weight: float) -> bool:
    """Finite and at most ``max_abs_weight`` (0: no bound); NaN fails every comparison."""
    return largest < float("inf") and (max_abs_weight <= 0 or largest <= max_abs_weight)


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
