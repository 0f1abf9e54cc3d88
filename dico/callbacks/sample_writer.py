"""Write generated samples (``predict``) as resumable parts, then one ADM-format ``.npz`` and a grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from dico.evaluation.images import save_grid, save_npz


def finished_batches(out_dir: str | Path, batch_size: int) -> set[int]:
    """Batches of a sample job whose part file exists (for resuming)."""
    parts = Path(out_dir) / "parts"
    return {int(p.stem) // batch_size for p in parts.glob("*.npz")} if parts.exists() else set()


class SampleWriter(BasePredictionWriter):
    """Each predicted batch goes to ``out_dir/parts/<first index>.npz`` as soon as it is made (so an
    interrupted job loses at most one batch per device); at the end rank 0 merges the parts in index order into
    ``out_dir/samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and draws ``samples.png``."""

    def __init__(self, out_dir: str = "samples", grid_size: int = 100) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.grid_size = grid_size

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        first = int(prediction["index"][0])
        save_npz(self.out_dir / "parts" / f"{first:09d}.npz", prediction["images"], prediction["labels"])

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            merge_parts(self.out_dir, self.grid_size)


def merge_parts(out_dir: str | Path, grid_size: int = 100) -> Path:
    out_dir = Path(out_dir)
    parts = sorted((out_dir / "parts").glob("*.npz"))
    if not parts:
        raise FileNotFoundError(f"no sample parts in {out_dir / 'parts'}")
    images, labels = [], []
    for part in parts:
        with np.load(part) as data:
            images.append(data["arr_0"])
            labels.append(data["arr_1"])
    all_images = np.concatenate(images)
    path = save_npz(out_dir / "samples.npz", all_images, np.concatenate(labels))
    shown = torch.from_numpy(all_images[:grid_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    save_grid(out_dir / "samples.png", shown, nrow=max(1, int(len(shown) ** 0.5)))
    return path
