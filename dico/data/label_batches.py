"""What a sample set draws, batch by batch: sample indices, class labels and noise seeds (the data of ``predict``).

Sample ``i`` has a class drawn uniformly at random from its batch's seed (``uniform``, as the published
``sample_ddp.py`` draws them) or class ``i % num_classes`` (``balanced``). Batch ``b`` is seeded by
:meth:`LabelBatches.batch_seed`, a function of the set's seed and the batch's first index only, and runs on rank
``b % world_size``, so a model and a set give the same samples on any number of devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

LABEL_LAYOUTS = ("uniform", "balanced")


@dataclass(frozen=True)
class LabelBatches:
    """A class-labelled, seeded set of ``num_samples`` samples split into fixed batches.

    Args:
        num_samples: how many samples (>= 1).
        num_classes: the model's number of classes.
        batch_size: samples per batch (>= 1); keep it fixed to reproduce a set.
        seed: the set's seed; batch ``b`` draws its noise from :meth:`batch_seed`.
        labels: ``uniform`` (labels drawn uniformly at random per batch from its seed, as the published
            ``sample_ddp.py`` draws them: the paper's protocol) or ``balanced`` (sample i has class i % num_classes;
            exactly balanced, which lowers FID: see docs/evaluation.md).
    """

    num_samples: int
    num_classes: int
    batch_size: int
    seed: int = 0
    labels: str = "uniform"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (the paper's protocol uses 50000), got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (e.g. 64; lower it if memory runs out), got {self.batch_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.labels not in LABEL_LAYOUTS:
            raise ValueError(f"labels must be one of {LABEL_LAYOUTS}, got {self.labels!r}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_seed(self, b: int) -> int:
        """The noise seed of batch ``b`` (a function of the set's seed and the batch's first index only)."""
        return self.seed * 1_000_003 + b * self.batch_size

    def batch_index(self, b: int) -> Tensor:
        return torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))

    def batch(self, b: int) -> dict[str, Any]:
        """Batch ``b``: sample ``index`` (B,), labels ``y`` (B,) and its ``seed``."""
        index = self.batch_index(b)
        if self.labels == "balanced":
            y = index % self.num_classes
        else:
            g = torch.Generator().manual_seed(self.batch_seed(b))
            y = torch.randint(0, self.num_classes, (len(index),), generator=g)
        return {"index": index, "y": y, "seed": self.batch_seed(b)}

    def rank_batches(self, rank: int, world_size: int) -> list[int]:
        """The batches rank ``rank`` of ``world_size`` makes (round robin)."""
        return list(range(rank, self.num_batches, world_size))

    def dataset(self, skip: set[int] | frozenset[int] = frozenset()) -> Dataset:
        """The batches not in ``skip`` as a map-style dataset (use ``DataLoader(..., batch_size=None)``)."""
        return SampleBatches(self, [b for b in range(self.num_batches) if b not in skip])


class SampleBatches(Dataset):
    """Selected batches of a :class:`LabelBatches` set (item i is the batch dict of ``batches[i]``)."""

    def __init__(self, sample_set: LabelBatches, batches: list[int]) -> None:
        self.sample_set, self.batches = sample_set, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sample_set.batch(self.batches[i])
