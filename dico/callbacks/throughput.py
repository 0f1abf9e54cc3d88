"""Images/s of training, logged every ``log_every_n_steps`` without synchronising the device.

Lightning's ThroughputMonitor calls ``torch.cuda.synchronize()`` after every batch; over a logging window
of many steps the wall clock alone is accurate (the device can run ahead by a step or two at most), so this
callback only reads the clock when it logs.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dico.compat import accumulating


class Throughput(Callback):
    """Logs ``train/images_per_sec`` (all devices together) and ``train/sec_per_step``."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._step0 = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:  # first batch after (re)start: begin a window
            self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = trainer.log_every_n_steps
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps <= 0 or trainer.global_step % every or accumulating(trainer):
            return
        elapsed = time.perf_counter() - self._t0
        images = steps * batch["y"].shape[0] * trainer.accumulate_grad_batches * trainer.world_size
        pl_module.log_dict(
            {"train/images_per_sec": images / elapsed, "train/sec_per_step": elapsed / steps}, rank_zero_only=True
        )
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = None  # do not count validation or sampling time as training
