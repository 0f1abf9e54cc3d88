"""Periodic FID during training and the paper's test protocol, through torch-fidelity (thin glue over
:mod:`dico.evaluation.protocol`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dico.callbacks.ema import ema_weights
from dico.callbacks.sample_grid import run_dir
from dico.evaluation.fidelity import INCEPTION, FeatureSpec, Reference
from dico.evaluation.images import save_grid
from dico.evaluation.protocol import EvalSettings, compute_reference, evaluate, write_record


class FIDEvaluation(Callback):
    """Scores EMA samples with FID, Inception Score, precision/recall and KID.

    During ``fit``: every ``every_n_steps`` optimizer steps (and at the start if ``at_start``, and at the end;
    ``every_n_steps=0`` and no ``at_start`` turn periodic evaluation off) on ``num_samples`` samples; metrics go
    to every logger as ``eval/<metric>``, a grid to wandb, a JSON record to ``<run>/eval/step_N.json``; with
    ``save_best`` the best-FID model is kept as ``<run>/checkpoints/best_fid.ckpt``.

    During ``test``: the paper's protocol on ``test_num_samples`` (50,000) samples with ``test_sampler`` /
    ``test_steps`` (250-step iDDPM) and the module's guidance settings (or ``cfg_scale``/``guidance_mode``);
    writes ``<run>/test/record.json`` (sampler, steps, scale, mode, seeds, count, reference hash, checkpoint)
    next to the metrics and the samples as an ADM-format ``<run>/test/samples.npz``.

    Args:
        reference: reference statistics (``python cli.py reference``); computed from ``reference_source``
            and cached there when missing and a source is given.
        reference_source: image folder, ADM ``.npz`` reference batch, or ``digits``.
        feature_extractor / weights_path: see :class:`~dico.evaluation.fidelity.FeatureSpec`; Inception weights
            come from a local file when offline.
    """

    def __init__(
        self,
        reference: str,
        reference_source: str | None = None,
        reference_image_size: int | None = None,
        feature_extractor: str = INCEPTION,
        weights_path: str | None = None,
        every_n_steps: int = 50_000,
        at_start: bool = False,
        num_samples: int = 1000,
        batch_size: int = 64,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        guidance_mode: str | None = None,
        seed: int = 0,
        save_best: bool = False,
        test_num_samples: int = 50_000,
        test_sampler: str = "iddpm",
        test_steps: int = 250,
        test_save_samples: bool = True,
    ) -> None:
        self.reference_path = reference
        self.reference_source = reference_source
        self.reference_image_size = reference_image_size
        self.spec = FeatureSpec(feature_extractor, weights_path)
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.settings = EvalSettings(num_samples, batch_size, sampler, steps, cfg_scale, guidance_mode, seed)
        self.test_settings = EvalSettings(test_num_samples, batch_size, test_sampler, test_steps, cfg_scale,
                                          guidance_mode, seed)  # fmt: skip
        self.save_best = save_best
        self.test_save_samples = test_save_samples
        self.best_fid = float("inf")
        self._last_step = -1
        self._reference: Reference | None = None

    # -- reference ----------------------------------------------------------------------------------
    def reference(self, trainer: Trainer) -> Reference:
        if self._reference is None:
            path = Path(self.reference_path)
            if not path.exists() and self.reference_source is not None:
                if trainer.is_global_zero:
                    rank_zero_info(f"computing reference statistics of {self.reference_source} -> {path}")
                    compute_reference(self.reference_source, self.spec, self.reference_image_size).save(path)
                trainer.strategy.barrier()
            self._reference = Reference.load(path)
        return self._reference

    # -- one evaluation -----------------------------------------------------------------------------
    def _run(self, trainer: Trainer, pl_module: LightningModule, settings: EvalSettings, name: str,
             samples_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
        reference = self.reference(trainer)
        with ema_weights(pl_module), torch.no_grad():
            record = evaluate(pl_module, settings, reference, self.spec, trainer, samples_dir)
        record["step"] = trainer.global_step
        record["checkpoint"] = trainer.ckpt_path
        if trainer.is_global_zero:
            write_record(run_dir(trainer) / name, record)
        return record

    def _log(self, trainer: Trainer, pl_module: LightningModule, record: dict[str, Any]) -> None:
        short = {
            "frechet_inception_distance": "fid", "inception_score_mean": "is", "precision": "precision",
            "recall": "recall", "kernel_inception_distance_mean": "kid",
        }  # fmt: skip
        metrics = {f"eval/{short[k]}": v for k, v in record["metrics"].items() if k in short}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            labels = torch.arange(min(16, pl_module.model.num_classes))
            with ema_weights(pl_module):
                grid = save_grid(run_dir(trainer) / "eval" / f"step_{trainer.global_step:07d}.png",
                                 pl_module.sample(labels, seed=self.settings.seed), nrow=8)  # fmt: skip
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="eval/samples", images=[str(grid)], step=trainer.global_step)
        rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def _periodic(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        record = self._run(trainer, pl_module, self.settings, f"eval/step_{step:07d}.json")
        self._log(trainer, pl_module, record)
        fid = record["metrics"]["frechet_inception_distance"]
        if self.save_best and fid < self.best_fid:
            self.best_fid = fid
            trainer.save_checkpoint(run_dir(trainer) / "checkpoints" / "best_fid.ckpt", weights_only=False)

    # -- hooks ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self._periodic(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._periodic(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps > 0 or self.at_start:  # periodic evaluation is on: close it with the final model
            self._periodic(trainer, pl_module)  # (the EMA weights are in the model by now)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = run_dir(trainer) / "test"
        samples = out if self.test_save_samples else None
        record = self._run(trainer, pl_module, self.test_settings, "test/record.json", samples)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"test/{k}": v for k, v in record["metrics"].items()}, step=trainer.global_step)
        rank_zero_info(f"test protocol ({self.test_settings.num_samples} samples): {record['metrics']}")

    def state_dict(self) -> dict[str, Any]:
        return {"best_fid": self.best_fid}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_fid = state_dict.get("best_fid", float("inf"))
