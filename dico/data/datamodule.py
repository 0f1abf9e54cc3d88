"""LightningDataModules serving (latent or pixel) arrays in whole batches with exact-resume state.

``LatentDataModule`` reads a cache made by ``dico extract``; ``DigitsDataModule`` serves scikit-learn's bundled
8x8 digits in pixel space (the quickstart). Both split off a seeded validation set, shard the training set
over ranks with :class:`EpochSampler`, and keep in their checkpoint state how far into the epoch training got.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from .label_batches import LabelBatches
from .latents import InMemoryLatents, LatentArrays, ShardedLatents, identity_collate
from .sampler import EpochSampler
from .vae import vae_location


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves and restores with the checkpoint (its ``state_dict`` protocol): the state
    is how many batches of the current epoch were trained on (counted by the datamodule when a batch reaches the
    training step, so prefetched batches do not count); restoring makes the sampler skip them.

    Restoring also sets the sampler's epoch: Lightning loads this state and then builds the iterator, and with
    ``num_workers > 0`` building it already draws the first indices from the sampler, before the loop's own
    ``set_epoch`` call for the resumed epoch."""

    def __init__(self, *args: Any, progress: dict[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        return {**self.progress, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(
                f"the checkpoint was trained with data.batch_size={state['batch_size']}; resume with the same batch "
                f"size (got {self.batch_size}) so that the data order continues exactly"
            )
        self.progress.update(epoch=state["epoch"], batches=state["batches"])
        self.sampler.set_epoch(state["epoch"])  # type: ignore[attr-defined]
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)  # type: ignore[attr-defined]


class ArrayDataModule(LightningDataModule):
    """Shared logic; subclasses provide :meth:`build_dataset` and :attr:`decoder`."""

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.01,
        val_batch_size: int | None = None,
        seed: int = 0,
        predict_samples: int = 100,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.predict_samples = predict_samples
        self.dataset: LatentArrays | None = None
        self.progress = {"epoch": 0, "batches": 0}  # training batches consumed in the current epoch

    def check_before_fit(self, trainer: Any, model: Any, datamodule: Any) -> None:
        """Batch sizes, before ``fit`` writes anything (dico's Trainer calls it; shapes are the model's check)."""
        for name, value in (("batch_size", self.batch_size), ("val_batch_size", self.val_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} is {value}: give a positive number of samples per batch (per device)")

    # -- subclass interface ---------------------------------------------------------------------------
    def build_dataset(self) -> LatentArrays:
        raise NotImplementedError

    @property
    def decoder(self) -> dict[str, Any]:
        """How samples of this data become images: ``{"kind": "vae", ...}`` or ``{"kind": "pixels"}``."""
        raise NotImplementedError

    # -- shapes for the model check -------------------------------------------------------------------
    @property
    def data(self) -> LatentArrays:
        if self.dataset is None:
            self.dataset = self.build_dataset()
        return self.dataset

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    # -- checkpoint state -----------------------------------------------------------------------------
    def _global_batch(self) -> dict[str, int]:
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        return {"batch_size": self.batch_size, "processes": self._world()[0], "accumulate_grad_batches": accumulate}

    def state_dict(self) -> dict[str, Any]:
        """What makes the global batch, kept in the checkpoint to compare with when the run resumes."""
        return {"global_batch": self._global_batch()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming ``fit`` with another global batch (other processes or accumulation) is allowed, and said."""
        old, new = state.get("global_batch"), self._global_batch()
        if old is None or old == new or self.trainer is None or self.trainer.state.fn != "fit":
            return

        def said(parts: dict[str, int]) -> str:
            batch, processes, accumulate = parts["batch_size"], parts["processes"], parts["accumulate_grad_batches"]
            return f"{batch * processes * accumulate} = {batch} (batch_size) x {processes} (processes) x {accumulate}"

        rank_zero_warn(
            f"resuming with a global batch of {said(new)}; the checkpoint was trained with {said(old)}. The steps "
            "that follow see another number of samples each (learning rate and EMA per sample change) and the data "
            "order does not continue exactly. To continue the run as it was, resume with its processes "
            "(trainer.devices x trainer.num_nodes) and trainer.accumulate_grad_batches (the last factor)"
        )

    # -- splits ---------------------------------------------------------------------------------------
    def split(self) -> tuple[Tensor, Tensor]:
        """Seeded train / validation index split (the same on every rank and every run)."""
        n = len(self.data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 12345))
        n_val = min(n - 1, max(1, round(n * self.val_fraction))) if self.val_fraction > 0 else 0
        return order[n_val:].sort().values, order[:n_val].sort().values

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, sampler: EpochSampler, batch_size: int, drop_last: bool, cls: type = DataLoader, **kw: Any):
        return cls(
            self.data,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=identity_collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        train_idx, _ = self.split()
        world, rank = self._world()
        if len(train_idx) < self.batch_size * world:
            raise ValueError(
                f"{len(train_idx)} training samples cannot fill one batch of {self.batch_size} on {world} device(s); "
                "lower data.batch_size or val_fraction"
            )
        sampler = EpochSampler(
            self.data, num_replicas=world, rank=rank, seed=self.seed, flips=self.data.flips, subset=train_idx
        )
        return self._loader(sampler, self.batch_size, True, ResumableDataLoader, progress=self.progress)

    def val_dataloader(self) -> DataLoader:
        _, val_idx = self.split()
        world, rank = self._world()
        sampler = EpochSampler(
            self.data, num_replicas=world, rank=rank, shuffle=False, drop_last=False, flips=1, subset=val_idx
        )
        return self._loader(sampler, self.val_batch_size, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out split (the diffusion loss); the sample-based test protocol runs in ``FIDEvaluation``."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The batches of a class-balanced sample set (seeded by ``seed``); Lightning shards them over ranks."""
        batches = LabelBatches(self.predict_samples, self.num_classes, self.val_batch_size, self.seed, "balanced")
        return DataLoader(batches.dataset(), batch_size=None)

    # -- exact resume ---------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self.progress["epoch"]:
                self.progress.update(epoch=trainer.current_epoch, batches=0)
            self.progress["batches"] += 1
        return batch


class LatentDataModule(ArrayDataModule):
    """Cached VAE latents written by ``dico extract`` (memory-mapped shards + manifest). ``vae``: a local copy
    (``save_pretrained`` folder) of the cache's VAE to decode samples with, instead of its hub id (manifest)."""

    def __init__(self, root: str, verify_checksums: bool = False, vae: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.verify_checksums = verify_checksums
        self.vae = vae_location(vae) if vae else None

    def build_dataset(self) -> LatentArrays:
        return ShardedLatents(self.root, verify_checksums=self.verify_checksums)

    @property
    def decoder(self) -> dict[str, Any]:
        m = self.data.manifest  # type: ignore[attr-defined]
        return {"kind": "vae", "vae": self.vae or m.vae, "scale_factor": m.scale_factor}


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) as 1x8x8 pixels in [-1, 1]."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("val_fraction", 0.1)
        super().__init__(**kwargs)

    def build_dataset(self) -> LatentArrays:
        images, labels = load_digits_arrays()
        return InMemoryLatents(images, labels, num_classes=10)

    @property
    def decoder(self) -> dict[str, Any]:
        return {"kind": "pixels"}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Digits as (N, 1, 8, 8) float32 in [-1, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return images[:, None], digits.target.astype(np.int64)
