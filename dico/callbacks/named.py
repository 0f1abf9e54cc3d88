"""The named callbacks of every ``python cli.py fit|validate|test|predict`` run (why: docs/callbacks.md).

Each callback is a config key of its own, so that every argument is set by name and defaults to the callback's
signature: ``--fid.num_samples 200`` or ``fid: {num_samples: 200}``. ``--fid null`` turns one off; naming its class
(``--heldout_loss HeldOutLoss``) or setting one of its arguments turns it on. ``trainer.callbacks`` holds any further
callbacks; they run before these.
"""

from __future__ import annotations

import importlib
from pathlib import Path
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


RENAMED = {
    "ema_decay": "ema.decay",
    "ema_warmup": "ema.warmup",
    "checkpoint_every_n_steps": "checkpoint.every_n_train_steps",
    "milestone_every_n_steps": "milestones.every_n_train_steps",
    "grid_every_n_steps": "grid.every_n_steps",
    "grid_per_class": "grid.per_class",
    "grid_classes_shown": "grid.num_classes_shown",
    "grid_final_per_class": "grid.final_per_class",
    "disabled": "KEY: null, for each callback it named",
}
"""The keys of the former ``callback_settings:`` block -> where each value goes now (``fid_X`` -> ``fid.X``)."""


def _new_home(old_key: str) -> str:
    if old_key in RENAMED:
        return RENAMED[old_key]
    return "fid." + old_key.removeprefix("fid_") if old_key.startswith("fid_") else "see docs/callbacks.md"


def refuse_former_settings(argv: list[str]) -> None:
    """A ``callback_settings`` block in a ``-c`` file or on the command line (the relay these keys replaced) is
    refused with where each of its values goes now, instead of jsonargparse's bare "not accepted"."""
    import yaml

    old: list[str] = []
    for i, token in enumerate(argv):
        path = argv[i + 1] if token in ("-c", "--config") and i + 1 < len(argv) else None
        path = token.partition("=")[2] if token.startswith("--config=") else path
        if path and Path(path).is_file():
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except (yaml.YAMLError, UnicodeDecodeError):  # jsonargparse names what is wrong with the file
                continue
            block = loaded.get("callback_settings") if isinstance(loaded, dict) else None
            if isinstance(block, dict):
                old += [str(k) for k in block]
            elif block is not None:
                old.append("callback_settings")
        elif token.startswith("--callback_settings"):
            old.append(token.split("=")[0].removeprefix("--callback_settings").lstrip(".") or "callback_settings")
    if old:
        moves = [f"{k} -> {_new_home(k)}" for k in dict.fromkeys(old)]
        raise ValueError(
            "callback_settings is gone: each callback is a config key of its own (docs/callbacks.md); move "
            f"{'; '.join(moves)} (in a config file under the key's init_args:, e.g. `ema: {{init_args: {{decay: "
            "0.999}}`; on the command line --ema.decay 0.999)"
        )
