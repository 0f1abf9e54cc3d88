"""The training sampler: which sample (and which flip) each rank reads, as a pure function of (seed, epoch).

Subclasses :class:`~torch.utils.data.DistributedSampler` so that Lightning keeps it (and calls ``set_epoch``)
under DDP. Keys are ``2 * index + flip``; the flip bit is drawn with the permutation. After a resume the first
epoch skips the samples already trained on, so the data order continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        flips: int = 1,
        subset: torch.Tensor | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.flips = flips
        self.subset = subset  # indices of the dataset this sampler draws from (a train/validation split)
        n = len(subset) if subset is not None else len(dataset)  # type: ignore[arg-type]
        if drop_last and n % num_replicas:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = -(-n // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._n = n
        self._skip = 0
        self._skip_epoch = -1

    def resume(self, epoch: int, samples_done: int) -> None:
        """Skip the first ``samples_done`` samples of this rank's share of ``epoch`` (once)."""
        self._skip_epoch, self._skip = epoch, samples_done

    def keys(self, epoch: int) -> torch.Tensor:
        """This rank's keys for an epoch, all of them (no resume skip)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self._n, generator=g) if self.shuffle else torch.arange(self._n)
        flip = torch.randint(0, self.flips, (self._n,), generator=g) if self.flips > 1 else torch.zeros_like(order)
        if self.total_size > self._n:  # pad by wrapping, as DistributedSampler does
            pad = self.total_size - self._n
            order, flip = torch.cat([order, order[:pad]]), torch.cat([flip, flip[:pad]])
        order, flip = order[: self.total_size], flip[: self.total_size]
        index = self.subset[order] if self.subset is not None else order
        keys = 2 * index + flip
        return keys[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        keys = self.keys(self.epoch)
        if self.epoch == self._skip_epoch:
            keys, self._skip_epoch = keys[self._skip :], -1
        return iter(keys.tolist())

    def __len__(self) -> int:
        return self.num_samples
