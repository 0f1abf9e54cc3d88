"""Write generated samples (``predict``) as resumable parts, then one ADM-format ``.npz`` and a grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from dico.data.label_batches import LabelBatches
from dico.evaluation.sample_set import SampleSet


def predicted_sample_set(trainer: Trainer) -> SampleSet:
    """The :class:`SampleSet` behind the trainer's predict loader (``SampleSet.dataset()``, or the data module's
    :class:`~dico.data.label_batches.LabelBatches`, drawn with the module's sampling defaults)."""
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    sample_set = getattr(getattr(loader, "dataset", None), "sample_set", None)
    if not isinstance(sample_set, LabelBatches):
        raise TypeError("SampleWriter writes the batches of a SampleSet: predict with DataLoader(set.dataset())")
    return sample_set if isinstance(sample_set, SampleSet) else SampleSet(**asdict(sample_set))


class SampleWriter(BasePredictionWriter):
    """Each predicted batch of a :class:`SampleSet` goes to ``out_dir/parts/<job key>/<first index>.npz`` as soon
    as it is made (an interrupted job loses at most one batch per device; the key names the set and
    ``source``, so parts of another job never mix in); at the end rank 0 merges exactly the set's parts into
    ``out_dir/samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and draws ``samples.png``.

    Args:
        out_dir: output folder.
        grid_size: samples shown in ``samples.png``.
        source: what made the samples (e.g. the checkpoint); ``None``: the trainer's ``ckpt_path``.
    """

    decodes_samples = True  # the module checks at setup that it can decode (the VAE of a latent model)

    def __init__(self, out_dir: str = "samples", grid_size: int = 100, source: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.grid_size = grid_size
        self.source = source

    def _key(self, trainer: Trainer) -> tuple[SampleSet, str]:
        sample_set = predicted_sample_set(trainer)
        return sample_set, sample_set.job_key(self.source if self.source is not None else str(trainer.ckpt_path))

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
        sample_set, key = self._key(trainer)
        b = int(prediction["index"][0]) // sample_set.batch_size
        sample_set.write_part(self.out_dir, key, b, prediction["images"], prediction["labels"])

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            sample_set, key = self._key(trainer)
            sample_set.merge(self.out_dir, key, self.grid_size)
