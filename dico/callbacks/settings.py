"""The named values of the one callback list (``dico/callbacks/callbacks.yaml``) that every run composes.

``python cli.py fit|validate|test|predict`` loads that list before the ``-c`` files; a config changes a setup by
these values (``callback_settings.ema_decay: 0.995``), so adding a callback is one edit of that file. A config may
still replace the whole list (``trainer.callbacks: [...]``), as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dico.evaluation.fidelity import INCEPTION

CALLBACKS_FILE = "callbacks.yaml"  # beside this file


@dataclass
class CallbackSettings:
    """The settings that differ between setups; the defaults are the paper's (experiments/base.yaml).

    Args:
        ema_decay, ema_warmup: :class:`~dico.callbacks.EMA`'s ``decay`` and ``warmup``.
        checkpoint_every_n_steps: how often the resumable ``checkpoints/last.ckpt`` is rewritten.
        milestone_every_n_steps: keep ``checkpoints/{step:07d}.ckpt`` this often (0: no kept milestones).
        grid_every_n_steps, grid_per_class, grid_classes_shown, grid_final_per_class: the sample grids'
            ``every_n_steps``, ``per_class`` (0: no grids), ``num_classes_shown`` and ``final_per_class``.
        fid_*: :class:`~dico.callbacks.FIDEvaluation`'s arguments of the same names (``fid_reference`` is its
            ``reference``).
        heldout_steps: :class:`~dico.callbacks.HeldOutLoss`'s ``steps`` (the held-out loss along the way).
        disabled: class names of the list's callbacks this setup runs without (by default the held-out loss, which only
            the crops16 ablation budget scores by; it turns the FID and the sample grids off instead).
    """

    ema_decay: float = 0.9999
    ema_warmup: bool = False
    checkpoint_every_n_steps: int = 2000
    milestone_every_n_steps: int = 50_000
    grid_every_n_steps: int = 10_000
    grid_per_class: int = 2
    grid_classes_shown: int = 16
    grid_final_per_class: int = 0
    fid_reference: str = "reference.npz"
    fid_reference_source: str | None = None
    fid_feature_extractor: str = INCEPTION
    fid_weights_path: str | None = None
    fid_at_start: bool = False
    fid_every_n_steps: int = 50_000
    fid_num_samples: int = 5000
    fid_batch_size: int = 125
    fid_sampler: str | None = None
    fid_steps: int | None = None
    fid_test_num_samples: int = 50_000
    fid_test_sampler: str = "iddpm"
    fid_test_steps: int = 250
    fid_test_save_samples: bool = True
    heldout_steps: list[int] = field(default_factory=list)
    disabled: list[str] = field(default_factory=lambda: ["HeldOutLoss"])


def class_name(callback: Any) -> str:
    """``FIDEvaluation`` of a callback entry of a config (a dict or a jsonargparse Namespace with ``class_path``)."""
    path = callback["class_path"] if isinstance(callback, dict) else callback.class_path
    return path.rsplit(".", 1)[-1]


def active_callbacks(callbacks: list[Any], disabled: Iterable[str]) -> list[Any]:
    """The entries of ``callbacks`` that a setup with ``callback_settings.disabled`` runs. A disabled name that is
    in neither the one list nor ``callbacks`` (a config may replace the list) is an error: a misspelt name would
    otherwise leave its callback on."""
    import yaml

    one_list = yaml.safe_load(Path(__file__).with_name(CALLBACKS_FILE).read_text())["trainer"]["callbacks"]
    off, names = set(disabled), [class_name(cb) for cb in callbacks]
    if unknown := sorted(off - set(names) - {class_name(cb) for cb in one_list}):
        raise ValueError(f"callback_settings.disabled names {unknown}, which the callback list does not hold: {names}")
    return [cb for cb, name in zip(callbacks, names, strict=True) if name not in off]
