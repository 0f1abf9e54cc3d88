"""The Lightning internals dico relies on where Lightning has no public API, in one place.

Everything else in dico uses Lightning's public API. Each function below says what it stands in for; the names it
touches, and the private methods that dico's subclasses override (:data:`PRIVATE_NAMES`), are checked against the
installed Lightning by ``tests/test_compat.py``, which fails when Lightning renames or reshapes one of them.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loops import _TrainingEpochLoop
from torch import nn

#: (owner, private name, its parameters after ``self`` or None for an attribute) for every private Lightning name
#: dico uses: read or called here, or overridden by a dico subclass (``dico.loggers``, ``dico.callbacks.ema``).
PRIVATE_NAMES: list[tuple[type, str, list[str] | None]] = [
    (Trainer, "_signal_connector", None),
    (_TrainingEpochLoop, "_should_accumulate", []),
    (ModelCheckpoint, "_last_global_step_saved", None),
    (ModelCheckpoint, "_monitor_candidates", ["trainer"]),
    (ModelCheckpoint, "_save_last_checkpoint", ["trainer", "monitor_candidates"]),
    (WeightAveraging, "_average_model", None),
    (WeightAveraging, "_latest_update_step", None),
    (WeightAveraging, "_swap_models", ["pl_module"]),
    (ExperimentWriter, "_check_log_dir_exists", []),  # overridden: keep metrics.csv on resume
    (ExperimentWriter, "_fs", None),
    (CSVLogger, "_experiment", None),  # the cached writer of the ``experiment`` property dico overrides
    (CSVLogger, "_fs", None),
]


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def hold_sigterm(trainer: Trainer, held: bool) -> None:
    """Make Lightning forget a received SIGTERM (``held``), or see it again: it stops after the batch that
    ends with ``trainer.received_sigterm`` set (public to read, not to set)."""
    trainer._signal_connector.received_sigterm = not held


def accumulating(trainer: Trainer) -> bool:
    """Whether the batch that just ran only accumulates gradients (no optimizer step after it)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def save_last_now(keeper: ModelCheckpoint, trainer: Trainer) -> None:
    """``keeper``'s own ``last.ckpt`` save (its path and version counter, its state in the file), unless it saved
    at this step already. ModelCheckpoint saves only at its schedule's points."""
    if keeper._last_global_step_saved != trainer.global_step or not keeper.last_model_path:
        keeper._save_last_checkpoint(trainer, keeper._monitor_candidates(trainer))


def averaged_model(callback: WeightAveraging) -> nn.Module | None:
    """The callback's :class:`~torch.optim.swa_utils.AveragedModel` (None before setup)."""
    return callback._average_model


def swap_averaged(callback: WeightAveraging, pl_module: LightningModule) -> None:
    """Exchange the weights of ``pl_module`` and the callback's average, as its validation hooks do."""
    callback._swap_models(pl_module)


def latest_update_step(callback: WeightAveraging) -> int:
    """The global step of the callback's latest update of its average (saved in its state as such)."""
    return callback._latest_update_step


def set_latest_update_step(callback: WeightAveraging, step: int) -> None:
    """Record an update of the average made outside ``WeightAveraging.on_train_batch_end`` at ``step``."""
    callback._latest_update_step = step
