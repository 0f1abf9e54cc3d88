"""Periodic sample grids (fixed labels and noise, EMA weights), and the final sample set of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from dico.callbacks.ema import weights_suffix
from dico.evaluation.images import save_grid, save_npz, to_uint8


def run_dir(trainer: Trainer) -> Path:
    """Where a run's artifacts go: the trainer's ``default_root_dir``."""
    return Path(trainer.default_root_dir)


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of fit), sample ``per_class`` images for each of
    ``num_classes_shown`` classes with the same labels and noise each time, save ``samples/step_N.png`` and log
    it to wandb when a WandbLogger is attached (as ``samples_ema`` with an EMA callback, else ``samples``); the
    final grid is logged unless the last step's grid already was.

    ``final_per_class`` > 0 also writes the final samples (guided with the module's ``cfg_scale``) as an
    ADM-format ``samples/final.npz`` beside ``samples/final.png``. ``per_class`` 0 draws no grids.
    """

    decodes_samples = True  # the module checks at setup that it can decode (the VAE of a latent model)

    def __init__(
        self,
        every_n_steps: int = 10_000,
        per_class: int = 2,
        num_classes_shown: int = 16,
        seed: int = 0,
        final_per_class: int = 0,
        final_batch_size: int = 256,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.num_classes_shown = num_classes_shown
        self.seed = seed
        self.final_per_class = final_per_class
        self.final_batch_size = final_batch_size

    def _labels(self, pl_module: LightningModule, per_class: int) -> torch.Tensor:
        n = pl_module.model.num_classes
        shown = torch.linspace(0, n - 1, min(n, self.num_classes_shown)).round().long()
        return shown.repeat_interleave(per_class)

    def _grid(self, trainer: Trainer, pl_module: LightningModule, name: str, log: bool = True) -> Path:
        labels = self._labels(pl_module, self.per_class)
        images = pl_module.sample(labels, seed=self.seed)
        path = save_grid(run_dir(trainer) / "samples" / f"{name}.png", images, nrow=self.per_class)
        for logger in trainer.loggers if log else []:
            if hasattr(logger, "log_image"):
                key = f"samples{weights_suffix(pl_module)}"
                logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        return path

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if self.per_class <= 0 or self.every_n_steps <= 0:
            return
        if step % self.every_n_steps == 0 and step != getattr(self, "_last", -1):
            self._last = step
            self._grid(trainer, pl_module, f"step_{step:07d}")

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's weight averaging has copied the EMA weights into the model by now.
        if self.per_class > 0:  # logged unless this step's grid was (the same weights, labels and noise)
            self._grid(trainer, pl_module, "final", log=getattr(self, "_last", -1) != trainer.global_step)
        if self.final_per_class > 0:
            labels = self._labels(pl_module, self.final_per_class)
            chunks = [
                to_uint8(pl_module.sample(part, seed=self.seed + 1 + i))
                for i, part in enumerate(labels.split(self.final_batch_size))
            ]
            save_npz(run_dir(trainer) / "samples" / "final.npz", np.concatenate(chunks), labels.numpy())
