"""Checkpoint on SIGTERM (cluster preemption) at the next step boundary, before Lightning exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(Callback):
    """On SIGTERM Lightning finishes the current step and exits (``SIGTERMException``) without saving. This
    saves the resumable ``last.ckpt`` (atomically, like every Lightning checkpoint) right after that step, so
    that ``fit --ckpt_path last`` continues from there."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if not getattr(trainer, "received_sigterm", False):
            return
        checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
        dirpath = (
            Path(checkpoint.dirpath)
            if checkpoint is not None and checkpoint.dirpath
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        path = dirpath / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizer, loops, callbacks
        if checkpoint is not None:
            checkpoint.last_model_path = str(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with `fit --ckpt_path last`")
        trainer.should_stop = True
