"""Sample jobs from a training checkpoint or a release: the module built to sample from (any published format), and
sample sets with seeded labels, reproducible on any number of devices, resumable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from dico.callbacks.sample_writer import SampleWriter
from dico.checkpoints import LIGHTNING, checkpoint_format, inspect_checkpoint, load_weights, read_checkpoint
from dico.data.vae import vae_location
from dico.diffusion import SamplingOptions
from dico.evaluation.sample_set import SampleSet
from dico.module import DiffusionModule
from dico.pretrained import SD_SCALE_FACTOR, SD_VAE, check_vae_available


@dataclass
class SampleJob:
    """A sample job. Unset sampling options take the values the checkpoint was configured with.

    Args:
        ckpt: a checkpoint file: ours (Lightning; its ``state_dict`` holds the EMA weights) or a published one
            (DiCo/DiT state dict, or a training checkpoint ``{model, ema, opt, args}``: its EMA weights unless
            ``use_ema`` is false). ``pretrained``: a release name instead (``DiCo-XL-3750K``; hub cache).
        model, model_kwargs, image_size: the architecture, when the published weights do not tell it
            (inferred from keys and shapes; DiCo's latent side is ``image_size / 8``).
        vae: the VAE that decodes published models' samples (a hub id or a local folder).
        out: output folder: ``samples.npz`` (ADM format), ``samples.png``, ``samples.json``, ``parts/``.
        num_samples: how many samples.
        batch_size: samples per batch; keep it fixed to reproduce a set (a batch's noise is seeded by its first index).
        labels: ``uniform`` (random, seeded per batch, as the published sample_ddp.py) or ``balanced`` (sample i
            has class i % num_classes).
        cfg_scale, guidance_mode, sampler, steps, eta: see :class:`~dico.diffusion.SamplingOptions`.
        unsafe_full_unpickle: load a checkpoint that needs full unpickling (only for files you trust: unpickling
            can run arbitrary code). Off by default: checkpoints load with ``weights_only=True``.
    """

    ckpt: str | None = None
    pretrained: str | None = None
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    image_size: int | None = None
    vae: str | None = None
    use_ema: bool = True
    out: str = "samples"
    num_samples: int = 50_000
    batch_size: int = 64
    labels: str = "uniform"
    cfg_scale: float | None = None
    guidance_mode: str | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = "auto"
    precision: str = "32-true"
    unsafe_full_unpickle: bool = False

    @property
    def options(self) -> SamplingOptions:
        return SamplingOptions(self.sampler, self.steps, self.cfg_scale, self.guidance_mode, self.eta)

    def sample_set(self, num_classes: int) -> SampleSet:
        return SampleSet(self.num_samples, num_classes, self.batch_size, self.seed, self.labels, self.options)


def load_module(ckpt: str, unsafe_full_unpickle: bool = False, map_location: str = "cpu") -> DiffusionModule:
    """The :class:`DiffusionModule` of a dico Lightning checkpoint, read safely (``weights_only=True``) unless told
    otherwise; a published file is refused with a pointer to :func:`load_for_sampling`."""
    checkpoint = read_checkpoint(ckpt, unsafe_full_unpickle)
    if checkpoint_format(checkpoint) != LIGHTNING:
        raise ValueError(
            f"{ckpt} is a published checkpoint, not a dico training run's: sample it with `cli.py sample --ckpt` "
            "(dico.sample_jobs.load_for_sampling)"
        )
    return DiffusionModule.from_checkpoint(checkpoint).to(map_location)


def load_for_sampling(
    source: str,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    image_size: int | None = None,
    vae: str | None = None,
    use_ema: bool = True,
    unsafe_full_unpickle: bool = False,
) -> DiffusionModule:
    """A :class:`DiffusionModule` holding the weights of ``source`` (a path or a release name) in any published
    format, ready to sample: the release's guidance scale, 250-step iDDPM, samples decoded through ``vae`` (the
    SD VAE the models were trained with by default; a local folder works offline). ``module.weights_source``
    says what was loaded."""
    loaded = inspect_checkpoint(source, model, model_kwargs, image_size, use_ema, unsafe_full_unpickle)
    if loaded.format == LIGHTNING:
        module = load_module(str(loaded.path), unsafe_full_unpickle)
        if vae is not None and module.decoder_spec.get("kind") == "vae":
            module.decoder_spec = {**module.decoder_spec, "vae": vae}
    else:
        check_vae_available(vae or SD_VAE)
        decoder = {"kind": "vae", "vae": vae or SD_VAE, "scale_factor": SD_SCALE_FACTOR}
        cfg = loaded.release.cfg_scale if loaded.release else 1.0
        module = DiffusionModule(loaded.model, loaded.model_kwargs, cfg_scale=cfg, decoder=decoder)
        load_weights(module.model, loaded, loaded.model)
    if module.decoder_spec.get("kind") == "vae":
        check_vae_available(module.decoder_spec["vae"])
    module.weights_source = loaded
    return module.eval()


def weights_record(module: DiffusionModule) -> dict[str, Any]:
    """What a sample job's ``samples.json`` says about the weights and the decoding (the published comparison reads
    it): the architecture, the release the weights are (None for a dico checkpoint, even one fine-tuned from a
    release), the checkpoint file (format, sha256), whether the weights are an EMA, and the decoder (VAE)."""
    from dico.evaluation.protocol import file_sha256

    source = module.weights_source
    released = source.released
    checkpoint = {"path": str(source.path), "format": source.format, "sha256": file_sha256(source.path)}
    return {
        "model": module.hparams.model,
        "pretrained": released.name if released else None,
        "checkpoint": checkpoint,
        "ema": source.ema,
        "decoder": dict(module.decoder_spec),
    }


def run_sample_job(job: SampleJob) -> Path:
    """Make (or finish) the job's sample set in ``job.out``; returns the merged ``samples.npz``."""
    if (job.ckpt is None) == (job.pretrained is None):
        raise ValueError("give exactly one of --ckpt PATH and --pretrained NAME")
    job.sample_set(1)  # bad counts or options fail here, before anything is loaded or written
    if job.vae is not None:  # a local folder by its absolute path: the job resumes from any working folder
        job = replace(job, vae=vae_location(job.vae))
    module = load_for_sampling(
        job.ckpt or job.pretrained,  # type: ignore[arg-type]
        job.model,
        job.model_kwargs,
        job.image_size,
        job.vae,
        job.use_ema,
        job.unsafe_full_unpickle,
    )
    source = module.weights_source
    print(f"[dico sample] {source.describe()}")
    sample_set = job.sample_set(module.model.num_classes)
    sample_set = sample_set.with_options(sample_set.options.resolved(module.hparams))  # e.g. --steps 5000 fails here
    if sample_set.options.cfg_scale != 1.0 and module.model.null_label is None:
        raise ValueError(
            f"--cfg_scale {sample_set.options.cfg_scale} needs a model trained with label dropout "
            "(class_dropout_prob > 0); this one has no null label: sample with --cfg_scale 1"
        )
    out = Path(job.out)
    record = {**asdict(job), **asdict(sample_set.options), **weights_record(module)}
    previous = out / "samples.json"
    if previous.exists() and json.loads(previous.read_text()) != record:
        raise ValueError(
            f"{out} holds samples of another job ({previous}); use a new --out folder or delete the old one"
        )
    out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(record, indent=1))
    key = sample_set.job_key(json.dumps(record, sort_keys=True))
    pending = sample_set.dataset(skip=sample_set.finished(out, key))
    if len(pending):
        trainer = Trainer(
            accelerator=job.accelerator,
            devices=job.devices,
            precision=job.precision,
            logger=False,
            callbacks=[SampleWriter(str(out), source=json.dumps(record, sort_keys=True))],
            enable_model_summary=False,
        )
        trainer.predict(module, DataLoader(pending, batch_size=None), return_predictions=False)
        return out / "samples.npz"
    return sample_set.merge(out, key)
