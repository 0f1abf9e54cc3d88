"""Periodic FID during training and the paper's test protocol, through torch-fidelity (thin glue over
:mod:`dico.evaluation.protocol`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dico.callbacks.ema import ema_weights, samples_use_ema, weights_suffix
from dico.callbacks.sample_grid import run_dir
from dico.diffusion import SamplingOptions
from dico.evaluation.fidelity import INCEPTION, FeatureSpec, Featurizer, MetricOptions, metric_settings_used
from dico.evaluation.images import save_grid
from dico.evaluation.protocol import evaluate, write_record
from dico.evaluation.reference import OutdatedReference, Reference, check_source, compute_reference
from dico.evaluation.sample_set import SampleSet


class FIDEvaluation(Callback):
    """Scores EMA samples with FID, sFID, Inception Score, precision/recall and KID.

    During ``fit``: every ``every_n_steps`` optimizer steps (once per step, also with gradient accumulation; a
    step already evaluated before a resume is not evaluated again), at the start if ``at_start``, and at the
    end (``every_n_steps=0`` and no ``at_start`` turn periodic evaluation off) on ``num_samples`` samples;
    metrics go to every logger as ``eval/<metric>_ema`` (``eval/<metric>`` without an EMA callback: the live
    weights), a grid to wandb as ``eval/samples_ema``, a JSON record to
    ``<run>/eval/step_N.json``; with ``save_best`` the best-FID model is kept as ``<run>/checkpoints/best_fid.ckpt``.

    During ``test``: the paper's protocol on ``test_num_samples`` (50,000) samples with ``test_sampler`` /
    ``test_steps`` (250-step iDDPM) and the module's guidance settings (or ``cfg_scale``/``guidance_mode``);
    writes ``<run>/test/record.json`` (sample set, options, seeds, reference and its hash, conventions, the
    checkpoint and its step) next to the metrics, and exactly these samples as ``<run>/test/samples.npz``.
    ``test_num_samples=0`` turns the test protocol off (a run scored by its last periodic evaluation, as the
    ablation proxy budget is); ``test`` then fails with that reason instead of scoring nothing.

    The reference is loaded (or computed) and checked against the extractor and its weights when the trainer
    sets up, before any sampling.

    Args:
        reference: reference statistics (``python cli.py reference``); computed from ``reference_source``
            and cached there when missing and a source is given.
        reference_source: ADM ``.npz`` reference batch, image folder, or ``digits``.
        reference_image_size: the center crop of an image-folder source.
        feature_extractor / weights_path: see :class:`~dico.evaluation.fidelity.FeatureSpec`; Inception weights
            come from a local file when offline.
        labels: ``uniform`` (random, seeded: the published protocol) or ``balanced`` class labels (see
            :class:`~dico.evaluation.sample_set.SampleSet`); the records' ``settings.labels`` say which.
        convention: ``adm`` (the paper's numbers) or ``torch-fidelity``, see
            :class:`~dico.evaluation.fidelity.MetricOptions`.
    """

    decodes_samples = True  # the module checks at setup that it can decode (the VAE of a latent model)

    def __init__(
        self,
        reference: str,
        reference_source: str | None = None,
        reference_image_size: int | None = None,
        feature_extractor: str = INCEPTION,
        weights_path: str | None = None,
        every_n_steps: int = 50_000,
        at_start: bool = False,
        num_samples: int = 5000,
        batch_size: int = 125,
        sampler: str | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        guidance_mode: str | None = None,
        seed: int = 0,
        labels: str = "uniform",
        convention: str = "adm",
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
        self.metric_options = MetricOptions(convention)
        options = SamplingOptions(sampler, steps, cfg_scale, guidance_mode)
        test_options = SamplingOptions(test_sampler, test_steps, cfg_scale, guidance_mode)
        # Validated now (a bad count fails at start-up); the class count is the model's, set in ``setup``.
        self.sample_set = SampleSet(num_samples, 1, batch_size, seed, labels, options)
        self.test_set = (
            SampleSet(test_num_samples, 1, batch_size, seed, labels, test_options) if test_num_samples != 0 else None
        )
        self.save_best = save_best
        self.test_save_samples = test_save_samples
        self.best_fid = float("inf")
        self.last_evaluated_step = -1
        self._checkpoint_step: int | None = None
        self._checkpoint_ema: bool | None = None
        self._reference: Reference | None = None
        self._featurizer: Featurizer | None = None

    # -- reference ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "test" and self.test_set is None:
            raise ValueError(
                "FIDEvaluation has test_num_samples=0 (test protocol off); set --fid.test_num_samples (the paper's "
                "protocol: 50000) to score this checkpoint"
            )
        if stage in ("fit", "test"):
            count = len(self.reference(trainer, pl_module).features)
            for sample_set in (self.sample_set, self.test_set) if stage == "fit" else (self.test_set,):
                if sample_set is not None:  # too few samples fail now, not at the first evaluation
                    metric_settings_used(self.metric_options, sample_set.num_samples, count)

    def check_before_fit(self, trainer: Trainer, pl_module: LightningModule, datamodule: Any) -> None:
        """:meth:`setup`'s checks that need no feature extractor, before ``fit`` writes anything (dico's Trainer
        calls it): the source can make the reference; a cached reference reads, was made from that source with this
        extractor, and holds enough features for the sample counts. (Its weights are checked at setup.)"""
        path = Path(self.reference_path)
        if self.reference_source is not None:
            check_source(self.reference_source, self.reference_image_size)
            if not path.exists() or _outdated(path):
                return  # computed at setup
        reference = Reference.load(path)  # a missing or foreign file fails here, naming how to make one
        if self.reference_source is not None:
            fix = f"delete {path} to recompute it from {self.reference_source}, or set the FIDEvaluation reference"
            reference.check_made_by(
                self.reference_source, {"feature_extractor": self.spec.name}, self.reference_image_size, fix
            )
        elif (made := reference.meta.get("feature_extractor")) != self.spec.name:
            raise ValueError(
                f"the reference {path} was made with feature_extractor {made}, this evaluation uses "
                f"{self.spec.name}: point the FIDEvaluation reference at statistics made with {self.spec.name}"
            )
        for sample_set in (self.sample_set, self.test_set):
            if sample_set is not None:
                metric_settings_used(self.metric_options, sample_set.num_samples, len(reference.features))

    def reference(self, trainer: Trainer, pl_module: LightningModule) -> Reference:
        """The reference statistics (computed on rank 0 if missing and a source is given), checked against the
        feature extractor and its weights."""
        if self._featurizer is None:
            self._featurizer = Featurizer(self.spec, pl_module.device)
        if self._reference is None:
            path = Path(self.reference_path)
            missing = self.reference_source is not None and (not path.exists() or _outdated(path))
            if trainer.strategy.broadcast(missing, src=0):  # one decision: every rank meets the barrier
                if trainer.is_global_zero:
                    rank_zero_info(f"computing reference statistics of {self.reference_source} -> {path}")
                    compute_reference(self.reference_source, self._featurizer, self.reference_image_size).save(path)
                trainer.strategy.barrier()
            self._reference = Reference.load(path)
            self._reference.check(self._featurizer.identity)
            if self.reference_source is not None:  # a cached reference must be the one of reference_source
                fix = (
                    f"delete {path} to recompute it from {self.reference_source}, "
                    "or set --fid.reference to another file"
                )
                self._reference.check_made_by(self.reference_source, None, self.reference_image_size, fix)
        return self._reference

    # -- one evaluation -----------------------------------------------------------------------------
    def _run(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        sample_set: SampleSet,
        name: str,
        samples_dir: Path | None = None,
    ) -> dict[str, Any]:
        reference = self.reference(trainer, pl_module)
        assert self._featurizer is not None
        self._featurizer.extractor.to(pl_module.device)
        sample_set = replace(sample_set, num_classes=pl_module.model.num_classes)
        step = self._step(trainer)
        source = json.dumps({"checkpoint": str(trainer.ckpt_path), "step": step})
        with ema_weights(pl_module), torch.no_grad():
            record = evaluate(
                pl_module, sample_set, reference, self._featurizer, self.metric_options, trainer, samples_dir, source
            )
        record["step"] = step
        record["checkpoint"] = trainer.ckpt_path
        record["sample_job"] = self._sample_job(trainer, pl_module)
        if trainer.is_global_zero:
            write_record(run_dir(trainer) / name, record)
        return record

    @property
    def metric_notes(self) -> dict[str, str]:
        """What the logged KID is (the run's config shows it beside the curves)."""
        return {
            "kid": "eval/kid(_ema) and test/kernel_inception_distance_mean: KID in torch-fidelity's unit (unscaled; "
            "ADM reports no KID): the unbiased MMD^2 of the polynomial kernel (x.y/d + 1)^3 on the raw "
            f"{self.spec.name} features (d of them), so its size follows the features' magnitude (Inception: about "
            "1e-3 to 1e-1; the small classifiers' unnormalised features: thousands and more); compare it only "
            "between runs of one extractor"
        }

    def _sample_job(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """What sampled: the release whose weights ``test`` scores (see
        :func:`~dico.evaluation.published.release_of_test`; none during fit), whether the weights are an EMA, the
        precision and the decoder, as a sample job's ``samples.json`` says them."""
        from dico.evaluation.published import release_of_test

        release = release_of_test(trainer, pl_module) if trainer.state.fn == "test" else None
        source = getattr(pl_module, "weights_source", None)
        if trainer.state.fn == "fit":
            ema = samples_use_ema(pl_module)
        elif trainer.ckpt_path:
            ema = self._checkpoint_ema
        else:
            ema = source.ema if source is not None else None
        return {
            "pretrained": release.name if release else None,
            "checkpoint": trainer.ckpt_path,
            "ema": ema,
            "precision": str(trainer.precision),
            "decoder": dict(pl_module.decoder_spec),
        }

    def _step(self, trainer: Trainer) -> int:
        """The optimizer step of the weights: the trainer's during fit, the checkpoint's during test."""
        if trainer.state.fn == "fit" or self._checkpoint_step is None:
            return trainer.global_step
        return self._checkpoint_step

    def _log(self, trainer: Trainer, pl_module: LightningModule, record: dict[str, Any]) -> None:
        short = {
            "frechet_inception_distance": "fid",
            "spatial_frechet_inception_distance": "sfid",
            "inception_score_mean": "is",
            "precision": "precision",
            "recall": "recall",
            "kernel_inception_distance_mean": "kid",
        }
        suffix = weights_suffix(pl_module)
        metrics = {f"eval/{short[k]}{suffix}": v for k, v in record["metrics"].items() if k in short}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            labels = torch.arange(min(16, pl_module.model.num_classes))
            with ema_weights(pl_module):
                grid = save_grid(
                    run_dir(trainer) / "eval" / f"step_{trainer.global_step:07d}.png",
                    pl_module.sample(labels, seed=self.sample_set.seed),
                    nrow=8,
                )
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"eval/samples{suffix}", images=[str(grid)], step=trainer.global_step)
        settings = record["settings"]
        rank_zero_info(
            f"step {trainer.global_step}: "
            + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            + f" ({settings['num_samples']} samples, {settings['labels']} labels)"
        )

    def _periodic(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_evaluated_step:
            return
        self.last_evaluated_step = step
        record = self._run(trainer, pl_module, self.sample_set, f"eval/step_{step:07d}.json")
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
        # With gradient accumulation this runs for every micro-batch: only a step > 0 that the optimizer has just
        # reached and that was not evaluated yet (``last_evaluated_step`` is restored on resume) is due.
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._periodic(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_steps > 0 or self.at_start:  # periodic evaluation is on: close it with the final model
            self._periodic(trainer, pl_module)  # (the EMA weights are in the model by now)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        self._checkpoint_ema = "current_model_state" in checkpoint  # the EMA callback's live weights beside them

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.test_set is not None
        out = run_dir(trainer) / "test"
        samples = out if self.test_save_samples else None
        record = self._run(trainer, pl_module, self.test_set, "test/record.json", samples)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"test/{k}": v for k, v in record["metrics"].items()}, step=record["step"])
            title = (
                f"test protocol ({self.test_set.num_samples} samples, {self.test_set.labels} labels; {out}/record.json)"
            )
            bar = trainer.progress_bar_callback  # prints above a progress bar, not onto its line
            (bar.print if bar is not None else print)(metrics_table(title, record["metrics"]))

    def state_dict(self) -> dict[str, Any]:
        return {"best_fid": self.best_fid, "last_evaluated_step": self.last_evaluated_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_fid = state_dict.get("best_fid", float("inf"))
        self.last_evaluated_step = state_dict.get("last_evaluated_step", -1)


def metrics_table(title: str, metrics: dict[str, Any]) -> str:
    """``title`` over one aligned ``name  value`` row per metric."""
    shown = {name: f"{value:.6g}" if isinstance(value, float) else str(value) for name, value in metrics.items()}
    width = max(map(len, shown), default=0)
    return "\n".join([title, *(f"  {name:<{width}}  {value:>12}" for name, value in shown.items())])


def _outdated(path: Path) -> bool:
    """Whether ``path`` is a reference of an older dico format (then it is recomputed from its source)."""
    try:
        Reference.load(path)
    except OutdatedReference:
        return True
    return False
