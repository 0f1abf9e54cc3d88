"""The named callbacks of every ``python cli.py fit|validate|test|predict`` run (why: docs/callbacks.md).

Each callback is a config key of its own, so that every argument is set by name and defaults to the callback's
signature: ``--fid.num_samples 200`` or ``fid: {num_samples: 200}``. ``--fid null`` turns one off; naming its class
(``--heldout_loss HeldOutLoss``) or setting one of its arguments turns it on. ``trainer.callbacks`` holds any further
callbacks; they run before these.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from dico.callbacks.ema import EMA
from dico.callbacks.fid import FIDEvaluation
from dico.callbacks.heldout_loss import HeldOutLoss
from dico.callbacks.preemption import PreemptionCheckpoint
from dico.callbacks.sample_grid import SampleGrid
from dico.callbacks.throughput import Throughput

CALLBACKS: dict[str, type[Callback]] = {
    "ema": EMA,
    "milestones": ModelCheckpoint,  # kept checkpoints/{step:07d}.ckpt
    "checkpoint": ModelCheckpoint,  # the resumable checkpoints/last.ckpt (`fit --ckpt_path last`)
    "grid": SampleGrid,
    "fid": FIDEvaluation,
    "heldout_loss": HeldOutLoss,
    "preemption": PreemptionCheckpoint,
    "throughput": Throughput,
    "lr_monitor": LearningRateMonitor,
}
"""Config key -> the callback's class (the key also takes a subclass). Their arguments default to the signatures."""

OFF = {"heldout_loss"}
"""Off unless a setup turns it on: only the crops16 ablation budget scores by the held-out loss."""

SETTINGS_FILE = "callbacks.yaml"  # beside this file: what dico's runs need from Lightning's own callbacks


def parser_defaults() -> dict[str, Any]:
    """The parser's defaults of the named callbacks: their classes, or None when off (their arguments: the
    signatures, and :data:`SETTINGS_FILE` for Lightning's callbacks)."""
    return {key: None if key in OFF else class_path(cls) for key, cls in CALLBACKS.items()}


def class_path(cls: type) -> str:
    """``dico.callbacks.EMA``: the class's path through the package that exports it."""
    package = cls.__module__.rpartition(".")[0]
    exported = getattr(importlib.import_module(package), cls.__name__, None) is cls
    return f"{package if exported else cls.__module__}.{cls.__name__}"
