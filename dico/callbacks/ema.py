"""EMA of the weights, on top of Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`.

Lightning already keeps the averaged copy, saves it as the checkpoint's ``state_dict`` (the live weights go to
``current_model_state``), restores both on resume, swaps it in for validation and copies it into the model when
training ends. Added here: the published update (the average starts as the initial weights and moves by
``1 - decay`` after every optimizer step), an optional decay warm-up, a fused foreach update that never waits for
the device (``AveragedModel.update_parameters`` reads its update count back to the host twice per step), and a
context manager that swaps the average in for sampling at any time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

from dico.compat import (
    attached_trainer,
    averaged_model,
    latest_update_step,
    set_latest_update_step,
    swap_averaged,
)


class EMA(WeightAveraging):
    """Exponential moving average of the weights.

    Args:
        decay: the EMA decay per optimizer step (the default is the paper's).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates, for short runs.
        device: keep the average on this device (e.g. ``"cpu"`` to save accelerator memory, at the cost of copying
            every weight to it after each step); default: the device the model trains on.
        update_every_n_steps: update after every n-th optimizer step.
    """

    def __init__(
        self, decay: float = 0.9999, warmup: bool = False, device: str | None = None, update_every_n_steps: int = 1
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._update)
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        self.average_device = device
        self.num_updates = 0
        self._swapped = False  # the average is in the model right now
        self._swapped_by_validation = False
        self._ended = False  # fit ended: the model holds the average, the averaging copy the live weights
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None  # (averaged, live) tensors updated each step

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay

    def _update(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        """Called once per (device, dtype) group of tensors: ``a += (1 - decay) * (c - a)``."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(self.num_updates))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        # Lightning's schedule (WeightAveraging.on_train_batch_end), with the update below
        if trainer.global_step > latest_update_step(self) and self.should_update(step_idx=trainer.global_step - 1):
            self._update_average(pl_module)
            set_latest_update_step(self, trainer.global_step)
            self.num_updates += 1

    def _update_average(self, pl_module: LightningModule) -> None:
        """``AveragedModel.update_parameters`` for an average that starts as the initial weights (``n_averaged`` is
        1 from setup on), without its host reads of ``n_averaged``: one foreach lerp of the floating parameters and
        buffers (their lists built once per fit: the tensors stay the same objects, swaps copy values)."""
        average = averaged_model(self)
        assert average is not None
        if self._pairs is None:
            pairs = [
                (a.detach(), c.detach())
                for a, c in zip(
                    itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.parameters(), pl_module.buffers()),
                    strict=True,
                )
                if a.is_floating_point()
            ]
            self._pairs = ([a for a, _ in pairs], [c for _, c in pairs])
        averaged, current = self._pairs
        if averaged and averaged[0].device != current[0].device:  # EMA(device=...): copied over every update
            current = [c.to(a.device) for a, c in zip(averaged, current, strict=True)]
        if averaged:
            self._update(averaged, current, average.n_averaged)  # foreach groups by device and dtype itself
        average.n_averaged += 1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning builds the average in ``setup``, before the strategy moves the model to its device, so without
        an explicit ``device`` the average stayed on the CPU: every step copied all weights to the host and averaged
        them there (seconds per step for DiCo-XL). It follows the model instead."""
        if (average := averaged_model(self)) is not None and self.average_device is None:
            average.to(pl_module.device)
        self._pairs = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._pairs = None
        if stage == "fit":
            self._swapped = self._swapped_by_validation = self._ended = False
        if (average := averaged_model(self)) is not None:
            # The average starts as the initial weights (not as the weights after the first step).
            average.n_averaged.fill_(1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = state_dict.get("num_updates", 0)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The model ends fit with the average in it, as in Lightning, but swapped rather than copied in: the live
        weights stay in the averaging copy, so a checkpoint written after this (``ModelCheckpoint``'s last save
        at the end of training) still holds both and resumes exactly."""
        if averaged_model(self) is None:
            return
        if not self._swapped:
            swap_averaged(self, pl_module)
        self._swapped, self._swapped_by_validation, self._ended = True, False, True

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        average = averaged_model(self)
        if not self._ended or average is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # the checkpoint's state_dict (the model's) already is the average
        live = average.state_dict()
        checkpoint["current_model_state"] = {k[7:]: v for k, v in live.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in live.items() if not k.startswith("module.")}

    # -- swapping, tracked so that nested uses (sampling during validation) stay consistent ----------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._swapped and averaged_model(self) is not None:
            super().on_validation_epoch_start(trainer, pl_module)
            self._swapped = self._swapped_by_validation = True

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._swapped_by_validation:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = self._swapped_by_validation = False

    @contextmanager
    def averaged(self, pl_module: LightningModule) -> Iterator[None]:
        """Run the block with the averaged weights in the model (a no-op if they already are, or if there is no
        average: outside fit the model already holds the EMA weights loaded from the checkpoint)."""
        if averaged_model(self) is None or self._swapped:
            yield
            return
        swap_averaged(self, pl_module)
        self._swapped = True
        try:
            yield
        finally:
            swap_averaged(self, pl_module)
            self._swapped = False


def ema_weights(pl_module: LightningModule) -> Any:
    """Context manager: the EMA weights of ``pl_module``'s trainer's :class:`EMA` callback, if any."""
    trainer = attached_trainer(pl_module)
    for cb in trainer.callbacks if trainer is not None else []:  # type: ignore[attr-defined]
        if isinstance(cb, EMA):
            return cb.averaged(pl_module)
    return nullcontext()


def samples_use_ema(pl_module: LightningModule) -> bool:
    """Whether ``pl_module``'s trainer has an :class:`EMA` callback, whose average sampling during fit uses."""
    trainer = attached_trainer(pl_module)
    callbacks = trainer.callbacks if trainer is not None else []  # type: ignore[attr-defined]
    return any(isinstance(cb, EMA) for cb in callbacks)


def weights_suffix(pl_module: LightningModule) -> str:
    """What the names of logged sample grids and sample metrics end with: ``"_ema"`` when sampling uses an EMA
    average (:func:`samples_use_ema`), else ``""`` (the live weights)."""
    return "_ema" if samples_use_ema(pl_module) else ""
