"""Checkpoint on SIGTERM (cluster preemption) or on a time-limit signal at the next optimizer-step boundary, before
Lightning exits."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from dico.compat import accumulating, hold_sigterm, save_last_now

PREEMPTED_EXIT_CODE = 75
"""``python cli.py fit`` exits with this status (``EX_TEMPFAIL``: try again) after a SIGTERM or a time-limit signal,
so that requeue loops (``until python cli.py fit ... --ckpt_path last; do :; done``), Kubernetes Jobs and SLURM
scripts rerun it."""

TIME_LIMIT_SIGNALS = ("SIGUSR1", "SIGUSR2")
"""The signals a scheduler sends ahead of a job's time limit: ``SIGUSR1`` is Lightning's ``SLURMEnvironment``
requeue signal (``#SBATCH --signal=USR1@300``), ``SIGUSR2`` submitit's (its ``slurm_signal_delay_s``)."""


class PreemptionCheckpoint(Checkpoint):
    """On SIGTERM Lightning finishes the current batch and exits (``SIGTERMException``) without saving. This
    saves the resumable ``last.ckpt`` right after the step, so that ``fit --ckpt_path last`` continues from there.

    A time-limit signal (``signals``: SLURM's ``--signal``, sent ahead of the limit) is answered the same way while
    training: ``last.ckpt`` at the step reached, then Lightning's SIGTERM exit (``python cli.py fit`` exits with
    status 75, which the job script or submitit turns into a requeue). Lightning's own ``SLURMEnvironment`` handler
    of that signal (an extra ``hpc_ckpt_N.ckpt`` written from inside the step, which ``--ckpt_path last`` would not
    read) is replaced for the duration of training. The save's line in the log says how long after the signal it
    was done: the signal's advance must exceed that (``AtomicCheckpointIO`` logs every save's duration, so the first
    periodic save tells it before a time limit is ever reached).

    - Under gradient accumulation the stop is held back until the micro-batch that ends the accumulation: a
      save between micro-batches would lose the gradients accumulated so far.
    - The save goes through the :class:`ModelCheckpoint` that has ``save_last`` (its path, its state), so the
      resumed run keeps updating the same ``last.ckpt`` instead of writing ``last-v1.ckpt`` beside it.
    - Being a :class:`Checkpoint` (like Lightning's ``OnExceptionCheckpoint``), Lightning runs it after the other
      callbacks' ``on_train_batch_end``: the EMA update of this step is in the checkpoint whatever the callback
      order in the config. As for any checkpoint callback, ``enable_checkpointing=False`` refuses it, and Lightning
      adds no default ``ModelCheckpoint`` beside it (configs list their own).

    Under DDP every rank must receive the signal (SLURM and torchrun send it to every task).

    Args:
        signals: names of the time-limit signals (default :data:`TIME_LIMIT_SIGNALS`; ``[]``: SIGTERM only).
    """

    def __init__(self, signals: Sequence[str] = TIME_LIMIT_SIGNALS) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self._held = False  # a stop arrived mid-accumulation and waits for the optimizer step
        self._signalled: tuple[signal.Signals, float] | None = None  # a time-limit signal and when it came
        self._replaced: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning's own handlers (registered just before training), which it restores when the fit ends
        if threading.current_thread() is threading.main_thread():
            self._replaced = {s: signal.signal(s, self._on_time_limit) for s in self.signals}

    def _on_time_limit(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled is None:
            self._signalled = (signal.Signals(signum), time.monotonic())
            rank_zero_info(f"{signal.Signals(signum).name}: time limit ahead; saving last.ckpt after this step")

    def _restore_handlers(self) -> None:
        for s, handler in self._replaced.items():
            signal.signal(s, handler)
        self._replaced = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if not (trainer.received_sigterm or self._held or self._signalled):
            return
        if accumulating(trainer):
            hold_sigterm(trainer, True)  # Lightning would stop after this micro-batch
            self._held = True
            return
        hold_sigterm(trainer, False)  # Lightning stops after this batch (SIGTERMException: exit status 75)
        self._held = False
        path = self._save(trainer)
        name, since = "SIGTERM", ""
        if self._signalled:  # what the signal's advance must cover: the rest of the step and the save
            name, since = self._signalled[0].name, f", {time.monotonic() - self._signalled[1]:.1f} s after the signal"
        rank_zero_info(
            f"{name}: saved {path} at step {trainer.global_step}{since}; resume with `fit --ckpt_path last` "
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
