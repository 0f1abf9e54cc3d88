"""The Trainer the CLI builds: Lightning's, with batch limits that read a whole number as a count of batches, and a
``fit`` that checks its inputs before it writes anything, in a run folder of its own."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fsspec.utils import get_protocol
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch import Trainer as LightningTrainer

from dico.checkpoints import remove_partial_saves, resume_checkpoint
from dico.run_folder import run_folder_lock


class Trainer(LightningTrainer):
    """``lightning.pytorch.Trainer`` with ``limit_{train,val,test,predict}_batches`` typed ``int | float``, and
    :meth:`fit` checked first.

    Lightning types the limits ``float | int``; a config parser (jsonargparse, LightningCLI) tries the float first, so
    ``--trainer.limit_val_batches 1`` became ``1.0``, i.e. *every* batch instead of one (2 and more were cast back
    to a count by Lightning, 1 cannot be). Typed int-first, ``1`` is one batch and ``1.0`` or ``0.5`` fractions,
    as Lightning documents.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )

    def fit(
        self,
        model: LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Lightning's ``fit``, validated before anything is written and alone in its folder:

        1. rank 0 takes the lock of ``default_root_dir`` (:mod:`dico.run_folder`): a second ``fit`` into a busy
           folder stops, naming the running one; then it removes the temporary files of killed saves;
        2. ``ckpt_path`` is resolved (``last``: the newest ``last*.ckpt`` of the checkpoint folders) and read
           (``weights_only``); a damaged file stops the run, naming the newest sound checkpoint to resume from;
        3. the module, the data module and every callback with a ``check_before_fit(trainer, model, datamodule)``
           run it (data that does not fit the model, an unusable FID reference, ...).

        Only then do the loggers, ``config.yaml``, references and checkpoints get written. A start that fails leaves
        the run folder as it found it (a folder it made is removed again)."""
        root = self.default_root_dir
        local = get_protocol(str(root)) == "file"
        with run_folder_lock(root) if self.is_global_zero and local else nullcontext():
            folders = [Path(d) for cb in self.checkpoint_callbacks if (d := getattr(cb, "dirpath", None)) is not None]
            folders = [d for d in folders if get_protocol(str(d)) == "file"]
            if self.is_global_zero and local:
                remove_partial_saves([Path(root), *folders])
            max_abs_weight = float(getattr(model, "hparams", {}).get("max_abs_weight", 0.0))
            ckpt_path = resume_checkpoint(ckpt_path, folders, max_abs_weight)
            for part in (model, datamodule, *self.callbacks):
                check = getattr(part, "check_before_fit", None)
                if callable(check):
                    check(self, model, datamodule)
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)
