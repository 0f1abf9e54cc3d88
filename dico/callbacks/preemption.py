"""Checkpoint on SIGTERM (cluster preemption) at the next optimizer-step boundary, before Lightning exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from dico.compat import accumulating, hold_sigterm, save_last_now

PREEMPTED_EXIT_CODE = 75
"""``python cli.py fit`` exits with this status (``EX_TEMPFAIL``: try again) after a SIGTERM, so that requeue
loops (``until python cli.py fit ... --ckpt_path last; do :; done``), Kubernetes Jobs and SLURM scripts rerun it."""


class PreemptionCheckpoint(Checkpoint):
    """On SIGTERM Lightning finishes the current batch and exits (``SIGTERMException``) without saving. This
    saves the resumable ``last.ckpt`` right after the step, so that ``fit --ckpt_path last`` continues from there.

    - Under gradient accumulation the signal is held back until the micro-batch that ends the accumulation: a
      save between micro-batches would lose the gradients accumulated so far.
    - The save goes through the :class:`ModelCheckpoint` that has ``save_last`` (its path, its state), so the
      resumed run keeps updating the same ``last.ckpt`` instead of writing ``last-v1.ckpt`` beside it.
    - Being a :class:`Checkpoint` (like Lightning's ``OnExceptionCheckpoint``), Lightning runs it after the other
      callbacks' ``on_train_batch_end``: the EMA update of this step is in the checkpoint whatever the callback
      order in the config. As for any checkpoint callback, ``enable_checkpointing=False`` refuses it, and Lightning
      adds no default ``ModelCheckpoint`` beside it (configs list their own).

    Under DDP every rank must receive the signal (SLURM and torchrun send it to every task).
    """

    def __init__(self) -> None:
        self._held = False  # a SIGTERM arrived mid-accumulation and waits for the optimizer step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if not (trainer.received_sigterm or self._held):
            return
        if accumulating(trainer):
            hold_sigterm(trainer, True)  # Lightning would stop after this micro-batch
            self._held = True
            return
        hold_sigterm(trainer, False)  # Lightning stops after this batch
        self._held = False
        path = self._save(trainer)
        rank_zero_info(
            f"SIGTERM: saved {path} at step {trainer.global_step}; resume with `fit --ckpt_path last` "
            f"(`python cli.py fit` exits with status {PREEMPTED_EXIT_CODE})"
        )
        trainer.should_stop = True

    @staticmethod
    def _save(trainer: Trainer) -> str:
        checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        keeper = next((cb for cb in checkpoints if cb.save_last), None)
        if keeper is None:
            path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path, weights_only=False)
            return path
        # ModelCheckpoint's own save: the path (and its version counter) is set before the state is written,
        # so the checkpoint's ModelCheckpoint state points at the file itself.
        save_last_now(keeper, trainer)
        return keeper.last_model_path
