"""A low-variance score: the EMA model's diffusion loss on the held-out split at fixed timesteps and noise."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dico.callbacks.ema import ema_weights
from dico.callbacks.sample_grid import run_dir
from dico.diffusion.heldout import heldout_losses


class HeldOutLoss(Callback):
    """Scores the EMA weights by :func:`~dico.diffusion.heldout.heldout_losses` on the datamodule's held-out split
    (its validation/test indices; for :class:`~dico.data.ImageCropsDataModule` the fixed held-out crops).

    The timesteps and noise come from ``seed`` alone (not the training seed), so the score varies only with the
    weights: between two training seeds, only through what they trained. Runs at the end of ``fit`` (and at each
    of ``steps`` and every ``every_n_steps`` if > 0) and at the end of ``test``; rank 0 computes it on the whole set
    and writes ``<run>/eval/heldout_step_N.json`` (fit) or ``<run>/test/heldout.json`` (test): ``metrics``
    (``heldout_loss``, ``heldout_mse``, ``heldout_vb``), ``settings``, ``step``. Logged as ``eval/heldout_<term>``.
    The files are the scores along the way: a run resumed from a checkpoint keeps those made before it.

    Args:
        timesteps_per_sample: stratified timesteps per held-out sample (one per equal slice of [0, T)).
        seed: the timesteps' offsets and the noise.
        batch_size: forward batch (the score does not depend on it beyond float rounding).
        every_n_steps: also score every n optimizer steps during fit (0: at the end only).
        steps: also score at these optimizer steps during fit (those beyond ``max_steps`` are never reached), e.g.
            a fixed list shared by every row of an ablation, so that their scores pair step by step.
    """

    def __init__(
        self,
        timesteps_per_sample: int = 8,
        seed: int = 0,
        batch_size: int = 256,
        every_n_steps: int = 0,
        steps: Sequence[int] = (),
    ) -> None:
        if timesteps_per_sample < 1:
            raise ValueError(f"timesteps_per_sample must be >= 1, got {timesteps_per_sample}")
        if any(s < 1 for s in steps):
            raise ValueError(f"steps must be optimizer steps >= 1, got {list(steps)}")
        self.timesteps_per_sample = timesteps_per_sample
        self.seed = seed
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.steps = frozenset(steps)
        self._checkpoint_step: int | None = None
        self._scored_step: int | None = None

    def score(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The record of the model's current (EMA) weights on the held-out split."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "split"):
            raise ValueError("HeldOutLoss needs an ArrayDataModule (its held-out split is the scored set)")
        _, index = dm.split()
        if len(index) == 0:
            raise ValueError("HeldOutLoss: the data has no held-out split (data.val_fraction is 0)")
        batch = dm.data.read(index.numpy(), np.zeros(len(index), dtype=np.int64))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with ema_weights(pl_module):
                losses = heldout_losses(
                    pl_module.diffusion,
                    pl_module.model,
                    batch["x"].to(pl_module.device),
                    batch["y"].to(pl_module.device),
                    self.timesteps_per_sample,
                    self.seed,
                    self.batch_size,
                )
        finally:
            pl_module.train(was_training)
        fit = trainer.state.fn == "fit" or self._checkpoint_step is None
        return {
            "metrics": {f"heldout_{k}": v for k, v in losses.items()},
            "settings": {
                "num_samples": len(index),
                "timesteps_per_sample": self.timesteps_per_sample,
                "seed": self.seed,
                "timesteps": "stratified",
                "weights": "ema",
            },
            "feature_extractor": None,
            "step": trainer.global_step if fit else self._checkpoint_step,
            "checkpoint": trainer.ckpt_path,
        }

    def _run(self, trainer: Trainer, pl_module: LightningModule, name: str) -> None:
        if not trainer.is_global_zero:
            return
        record = self.score(trainer, pl_module)
        path = run_dir(trainer) / name.format(step=record["step"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(path)
        metrics = {f"eval/{k}": v for k, v in record["metrics"].items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])
        rank_zero_info(
            f"held-out loss at step {record['step']}: " + ", ".join(f"{k}={v:.5f}" for k, v in metrics.items())
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        periodic = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        if (periodic or step in self.steps) and step not in (trainer.max_steps, self._scored_step):
            self._scored_step = step  # once a step (several batches end at one step with gradient accumulation)
            self._run(trainer, pl_module, "eval/heldout_step_{step:07d}.json")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(trainer, pl_module, "eval/heldout_step_{step:07d}.json")

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            self._run(trainer, pl_module, "test/heldout.json")
