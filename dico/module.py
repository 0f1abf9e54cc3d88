"""The LightningModule: a registry backbone trained with the diffusion hybrid loss.

All randomness of a training step (posterior sample, timesteps, noise, label dropout) comes from a generator
seeded by (seed, rank, global step, batch index), so a resumed run draws exactly what the uninterrupted run
would have drawn.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from dico.callbacks.ema import ema_weights
from dico.checkpoints import apply_pretrained, newest_sound_checkpoint
from dico.compat import attached_trainer
from dico.diffusion import SamplingOptions, create_diffusion, generate, sampling_diffusion
from dico.divergence import Divergence, DivergenceRecord, largest_abs_weight, within_limit
from dico.evaluation.images import to_uint8
from dico.models import create_model
from dico.models.official import rename_pre_shared_block_keys


class TrainingDivergedError(FloatingPointError):
    """Training diverged; the message names the newest checkpoint whose weights are sound to resume from."""


class NonFiniteLossError(TrainingDivergedError):
    """Raised when the training loss is NaN or infinite; the last good checkpoint is left untouched."""


class DivergedWeightsError(TrainingDivergedError):
    """Raised when a weight is non-finite or larger than ``max_abs_weight`` (the loss may still look finite)."""


class DiffusionModule(LightningModule):
    """Backbone + Gaussian diffusion (linear schedule, learned sigma, hybrid loss), AdamW, sampling.

    Args:
        model: a registered model name (``DiCo-S`` ... ``DiT-XL/2``, or an ablation variant).
        model_kwargs: overrides of the named configuration (``num_classes``, ``in_channels``, ``input_size`` ...).
        lr, betas, weight_decay: AdamW (Table 6: 1e-4, (0.9, 0.999), 0; DiCo-H: 2e-4, (0.99, 0.99)).
        warmup_steps: linear learning-rate warm-up (DiCo-H: 5000); constant afterwards.
        diffusion_steps, noise_schedule: the training process (1000, ``linear``).
        sampler, sampling_steps, cfg_scale, guidance_mode, ddim_eta: defaults of :meth:`sample`.
        clip_denoised: clip x0 predictions to [-1, 1] while sampling (pixel space); off for latents.
        decoder: how samples become images, ``{"kind": "pixels"}`` or ``{"kind": "vae", "vae": id, "scale_factor"}``
            (filled in from the data by the CLI).
        seed: seeds the per-step randomness of training and validation.
        check_finite_every_n_steps: how often to check the loss for NaN/inf and the weights for divergence; 0 turns
            the checks off. The check runs on the device and is read (training stops, naming the first diverged
            step) at the next logging step, before any checkpoint is written and at the end of training.
        max_abs_weight: a weight beyond this magnitude (or NaN/inf) stops training as diverged; 0: finiteness only.
        compile: ``torch.compile`` the backbone in place (same state dict, so checkpoints load into compiled and
            eager models alike); ``true`` for torch's defaults (Inductor), or ``torch.compile``'s arguments, e.g.
            ``{mode: max-autotune-no-cudagraphs}`` or ``{dynamic: false}``.
        pretrained: start from released weights: a release name (``DiCo-XL-3750K``, see
            :data:`dico.pretrained.CATALOGUE`) or a checkpoint file in any published format. The model gets the
            EMA weights; ``fit`` then trains on from the non-EMA ones where the file has both (the EMA callback
            starts from the EMA ones).
    """

    def __init__(
        self,
        model: str = "DiCo-S",
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        diffusion_steps: int = 1000,
        noise_schedule: str = "linear",
        sampler: str = "iddpm",
        sampling_steps: int = 250,
        cfg_scale: float = 1.0,
        guidance_mode: str = "official",
        ddim_eta: float = 0.0,
        clip_denoised: bool = False,
        decoder: dict[str, Any] | None = None,
        seed: int = 0,
        check_finite_every_n_steps: int = 1,
        max_abs_weight: float = 1e3,
        compile: bool | dict[str, Any] = False,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        SamplingOptions().resolved(self.hparams)  # the sampling defaults, validated before anything is built
        self.model = create_model(model, **(model_kwargs or {}))
        self.weights_source: Any = None  # what `pretrained` loaded (dico.checkpoints.LoadedWeights)
        self._training_weights: dict[str, Tensor] | None = None  # a training checkpoint's, until fit starts
        if pretrained:
            from dico.pretrained import WeightsNotFoundError

            try:
                self.load_released(pretrained)
            except WeightsNotFoundError as e:
                e.option = "--model.pretrained PATH"
                raise
        if compile:
            self.model.compile(**(compile if isinstance(compile, dict) else {}))
        self.diffusion = create_diffusion(
            "", noise_schedule, diffusion_steps=diffusion_steps, learn_sigma=self.model.learn_sigma
        )
        self.decoder_spec = decoder or {"kind": "pixels"}
        self._vae: Any = None
        self._divergence = DivergenceRecord()
        self._unlogged_terms: dict[str, Tensor] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> DiffusionModule:
        """The module a dico Lightning checkpoint holds (read with :func:`dico.checkpoints.read_checkpoint`): built from
        its hyper-parameters (no released weights fetched: its own are in the file) with its weights, strictly."""
        names = inspect.signature(cls.__init__).parameters
        hp = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in names}
        module = cls(**{**hp, "pretrained": None})
        module.on_load_checkpoint(checkpoint)  # keys of older dico versions renamed
        module.load_state_dict(checkpoint["state_dict"])
        return module

    def load_released(self, source: str, fine_tune: bool = True) -> Any:
        """Released weights into the model (a release name, or a file in any published format): the EMA weights,
        which sampling and the test protocol use; with ``fine_tune``, a training checkpoint's non-EMA weights wait
        until ``fit`` starts, so that fine-tuning continues from both (the EMA callback copies the model before the
        module's setup). Returns what was loaded (:class:`dico.checkpoints.LoadedWeights`)."""
        hp = self.hparams
        loaded = apply_pretrained(self.model, source, hp.model, hp.model_kwargs)
        self._training_weights = loaded.training_weights() if fine_tune else None
        self.weights_source = loaded
        return loaded

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._training_weights is not None:  # fine-tuning a released training checkpoint
            self.model.load_state_dict(self._training_weights)
            self._training_weights = None
        trainer = attached_trainer(self)
        self._check_inputs(trainer.callbacks if trainer is not None else [], trainer.datamodule if trainer else None)

    def check_before_fit(self, trainer: Any, model: Any, datamodule: Any) -> None:
        """:meth:`setup`'s checks, before ``fit`` writes anything (dico's Trainer calls it)."""
        self._check_inputs(trainer.callbacks, datamodule)

    def _check_inputs(self, callbacks: list[Any], dm: Any) -> None:
        """The VAE that decodes samples can be loaded; the data's shape and classes fit the model."""
        # a VAE that cannot be loaded fails here, not at the first sample grid after hours of training
        if self.decoder_spec.get("kind") == "vae" and any(getattr(c, "decodes_samples", False) for c in callbacks):
            from dico.pretrained import check_vae_available

            check_vae_available(self.decoder_spec["vae"], "--data.init_args.vae PATH")
        if dm is None or not hasattr(dm, "sample_shape"):
            return
        c, h, w = dm.sample_shape
        m = self.model
        problems = []
        if c != m.in_channels:
            problems.append(f"the data has {c} channels, the model takes {m.in_channels} (model_kwargs.in_channels)")
        if h % m.size_multiple or w % m.size_multiple:
            problems.append(f"the data is {h}x{w}, the model needs multiples of {m.size_multiple}")
        elif (h, w) != (m.input_size, m.input_size):  # it would train at the data's size but sample at its own
            problems.append(
                f"the data is {h}x{w}, the model is built for {m.input_size}x{m.input_size} (set "
                f"model_kwargs.input_size: {h}, or point the data at a cache of the model's resolution)"
            )
        if dm.num_classes != m.num_classes:
            problems.append(
                f"the data has {dm.num_classes} classes, the model {m.num_classes} (model_kwargs.num_classes)"
            )
        if problems:
            raise ValueError("the data does not fit the model: " + "; ".join(problems) + ". Fix the config and rerun.")

    # ------------------------------------------------------------------ training
    def _generator(self, *keys: int) -> torch.Generator:
        seed = hash((self.hparams.seed, *keys)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(self.device).manual_seed(seed)

    def _losses(self, batch: dict[str, Tensor], g: torch.Generator, train: bool) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        if "std" in batch and train:  # sample the VAE posterior
            x = x + batch["std"] * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        n = x.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=g, device=x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        kwargs: dict[str, Tensor] = {"y": y}
        p_drop = self.model.class_dropout_prob
        if train and p_drop > 0:
            kwargs["force_drop"] = torch.rand(n, generator=g, device=x.device) < p_drop
        terms = self.diffusion.training_losses(self.model, x, t, model_kwargs=kwargs, noise=noise)
        return {k: v.mean() for k, v in terms.items()}

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logged values (every ``log_every_n_steps``; every step of a
        ``fast_dev_run``). Values logged on other steps are never written, and reading them waits for the device."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        return bool(trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        g = self._generator(1, self.global_rank, self.global_step, batch_idx)
        terms = self._losses(batch, g, train=True)
        every = self.hparams.check_finite_every_n_steps
        if every > 0 and self.global_step % every == 0:
            # the weights of this step's forward: a diverged model can still give a finite loss for a while
            self._divergence.observe(self.global_step, terms, self.model.parameters(), self.hparams.max_abs_weight)
        self._unlogged_terms = None
        if self._logs_this_step():  # the host waits for the device here anyway
            self._log_terms(terms)
        else:  # kept (on the device) in case training stops after this step: Lightning writes that step's logs too
            self._unlogged_terms = terms
        return terms["loss"]

    def _log_terms(self, terms: dict[str, Tensor]) -> None:
        self._check_divergence()
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=False)
        # on the host: Lightning reads progress-bar values after every batch, logged this step or not
        self.log("loss", terms["loss"].detach().cpu(), prog_bar=True, logger=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A step where training stops (preemption, a callback's ``should_stop``) is logged by Lightning whatever
        ``log_every_n_steps`` says: log its own values rather than leave those of the last logged step."""
        if self._unlogged_terms is not None and self.trainer.should_stop:
            self._log_terms(self._unlogged_terms)
        self._unlogged_terms = None

    def _check_divergence(self, unwritten: bool = False) -> None:
        """Stop on the first observed step with a non-finite loss, or weights non-finite or beyond
        ``max_abs_weight``. One device sync."""
        found = self._divergence.read()
        if found is not None:
            suffix = f" (the checkpoint of step {self.global_step} was not written)" if unwritten else ""
            self._raise_divergence(found, suffix)

    def _raise_divergence(self, found: Divergence, suffix: str = "") -> None:
        limit = self.hparams.max_abs_weight
        if not found.loss_is_finite:
            values = ", ".join(f"{k}={v:.4g}" for k, v in found.terms.items())
            self._raise_diverged(
                NonFiniteLossError, f"non-finite training loss at step {found.step} ({values})" + suffix
            )
        self._raise_diverged(
            DivergedWeightsError,
            f"diverged weights at step {found.step}: max |w| = {found.largest_abs_weight:.4g}"
            + (f" > model.max_abs_weight = {limit:g}" if limit > 0 else "")
            + suffix,
        )

    def on_train_end(self) -> None:
        self._check_divergence()  # observed after the last logging step and checkpoint

    def _raise_diverged(self, error: type[TrainingDivergedError], what: str) -> None:
        candidates: set[Path] = set()
        for cb in self.trainer.checkpoint_callbacks:
            for name in ("last_model_path", "best_model_path"):
                if path := getattr(cb, name, None):
                    candidates.add(Path(path))
            if dirpath := getattr(cb, "dirpath", None):
                candidates.update(Path(dirpath).glob("*.ckpt"))
        good = newest_sound_checkpoint(sorted(candidates), self.hparams.max_abs_weight)
        fix = "lowering model.lr or setting trainer.gradient_clip_val (or try precision 32 if you trained in bf16)"
        if good:
            raise error(
                f"{what}. The newest checkpoint with sound weights is {good}; resume from it with "
                f"`fit --ckpt_path {good}` after {fix}."
            )
        raise error(f"{what}. No checkpoint with sound weights was saved before it: start the run again after {fix}.")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._logs_this_step():  # this step's gradients, on the step Lightning writes them
            grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
            if grads:  # one fused norm per tensor and their norm: no host read per parameter
                self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0))))

    def configure_optimizers(self) -> Any:
        """AdamW, fused (one kernel for all parameters; the loop implementation runs a Python loop over the
        parameters on CPUs) where every parameter is on a device that has the fused kernel."""
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, fused=fused or None
        )
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write diverged weights (live or EMA): a checkpoint saved between two divergence checks would
        otherwise replace the last sound one (``last.ckpt``, a rotated top-k file) with weights no run can use."""
        if attached_trainer(self) is not None:
            self._check_divergence(unwritten=True)  # a step observed since the last logging step
        limit = self.hparams.max_abs_weight
        parts = [checkpoint[k] for k in ("state_dict", "current_model_state") if k in checkpoint]
        unsound = [w for w in map(largest_abs_weight, parts) if not within_limit(w, limit)]
        if not unsound:
            return
        largest = unsound[0]
        self._raise_diverged(
            DivergedWeightsError,
            f"diverged weights at step {self.global_step}: max |w| = {largest:.4g}"
            + (f" > model.max_abs_weight = {limit:g}" if limit > 0 else "")
            + " (the checkpoint of this step was not written)",
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming ``fit``: the saved optimizer state must belong to these parameters, in this order. (Code that
        creates the parameters in another order -- another dico version -- would otherwise fail deep inside the
        optimizer step with a shape error. Same-shaped parameters that trade places cannot be told apart here.)

        Checkpoints of older dico versions load too: their DiT block keys are renamed first (live and EMA weights)."""
        for part in ("state_dict", "current_model_state"):
            if part in checkpoint:
                checkpoint[part] = rename_pre_shared_block_keys(checkpoint[part])
        trainer = attached_trainer(self)
        if trainer is None or trainer.state.fn != "fit" or not checkpoint.get("optimizer_states"):
            return
        params = [(n, p.shape) for n, p in self.model.named_parameters() if p.requires_grad]
        saved = checkpoint["optimizer_states"][0]
        count = sum(len(g["params"]) for g in saved.get("param_groups", []))
        problem = f"{count} parameters, the model has {len(params)}" if count != len(params) else None
        moments = saved.get("state", {})
        for i, (name, shape) in enumerate(params):
            moment = moments.get(i, {}).get("exp_avg")
            if problem is None and moment is not None and moment.shape != shape:
                problem = f"parameter {i} ({name}) is {tuple(shape)}, its saved moments {tuple(moment.shape)}"
        if problem:
            raise ValueError(
                f"cannot resume: the checkpoint's optimizer state does not match this model ({problem}); it was "
                "saved by another version of the model code. Resume it with that version, or start a new run from "
                "its weights (--model.pretrained CKPT, without --ckpt_path)"
            )

    # ------------------------------------------------------------------ evaluation (EMA weights)
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        g = self._generator(2, self.global_rank, batch_idx)  # the same draws at every validation
        terms = self._losses(batch, g, train=False)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch["x"].shape[0])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        g = self._generator(3, self.global_rank, batch_idx)
        terms = self._losses(batch, g, train=False)
        self.log_dict({f"test/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch["x"].shape[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate one batch of a :class:`~dico.evaluation.sample_set.SampleSet` (its labels, seed and sampling
        options), so the set does not depend on the number of devices."""
        images = self.sample(batch["y"], seed=int(batch["seed"]), **batch.get("options", {}))
        return {"images": to_uint8(images), "labels": batch["y"].cpu().numpy(), "index": batch["index"].cpu().numpy()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | list[int],
        cfg_scale: float | None = None,
        guidance_mode: str | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        eta: float | None = None,
        decode: bool = True,
        progress: bool = False,
    ) -> Tensor:
        """Samples for ``labels`` with the EMA weights: images in [-1, 1] (B, C, H, W), or latents if not ``decode``.

        Unset arguments take the module's configured defaults (``cfg_scale``, ``guidance_mode``, ...).
        """
        hp = self.hparams
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        options = SamplingOptions(sampler, steps, cfg_scale, guidance_mode, eta).resolved(hp)
        m = self.model
        shape = (m.in_channels, m.input_size, m.input_size)
        was_training = self.training
        self.eval()
        try:
            with ema_weights(self):
                z = generate(
                    m,
                    labels,
                    shape,
                    m.null_label,
                    **options.as_kwargs(),
                    seed=seed,
                    clip_denoised=hp.clip_denoised,
                    diffusion=sampling_diffusion(
                        options.sampler, options.steps, hp.diffusion_steps, hp.noise_schedule, m.learn_sigma
                    ),
                    progress=progress,
                )
        finally:
            self.train(was_training)
        return self.decode(z) if decode else z

    def decode(self, z: Tensor) -> Tensor:
        """Samples in model space -> images in [-1, 1] (through the VAE for latents)."""
        spec = self.decoder_spec
        if spec.get("kind") == "pixels":
            return z.clamp(-1, 1)
        if self._vae is None:
            from dico.data.vae import load_vae

            self._vae = load_vae(spec["vae"], self.device)
        from dico.data.vae import decode_latents

        return decode_latents(self._vae, z, spec.get("scale_factor", 0.18215))
