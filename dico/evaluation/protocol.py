"""The evaluation protocol: generate a :class:`SampleSet` with the EMA weights, split over ranks, featurise it,
and score it once against a :class:`Reference`.

Every rank makes its share of the batches (the same images on any number of devices), features are gathered
with torchmetrics' DDP-synchronised ``CatMetric`` state, rank 0 computes the metrics once (the N x N distances
of precision/recall are not repeated on every rank) and broadcasts them. The reference is checked against the
extractor, its weights and the samples' resolution before any sample is featurised.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .fidelity import Featurizer, MetricOptions, compute_metrics, metric_settings_used
from .images import iter_npz_images, npz_images_shape, to_uint8
from .reference import Reference
from .sample_set import SampleSet

CONVENTIONS_NOTE = {
    "adm": "ADM evaluator: FID/sFID against the reference's mu/sigma, IS over contiguous 5000-sample splits, "
    "precision/recall with its manifold estimator (k=3, float16 distances)",
    "torch-fidelity": "torch-fidelity: IS over 10 shuffled splits, precision/recall from float32 cdist (k=3)",
}


def sample_batch(module: Any, sample_set: SampleSet, b: int) -> tuple[Tensor, Tensor]:
    """uint8 (B, C, H, W) images and labels (B,) of batch ``b`` of ``sample_set``."""
    batch = sample_set.batch(b)
    images = module.sample(batch["y"], seed=batch["seed"], **batch["options"])
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2), batch["y"]


def _gathered(trainer: Any, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every rank's rows of ``local`` (the same keys everywhere), through torchmetrics' synchronised state."""
    from torchmetrics.aggregation import CatMetric

    if trainer is None or trainer.world_size == 1:
        return local
    out = {}
    for key in sorted(local):
        metric = CatMetric(nan_strategy="disable").to(trainer.strategy.root_device)
        metric.update(local[key].to(trainer.strategy.root_device))
        out[key] = metric.compute().cpu()
    return out


def evaluate(
    module: Any,
    sample_set: SampleSet,
    reference: Reference,
    featurizer: Featurizer,
    metrics: MetricOptions | None = None,
    trainer: Any = None,
    samples_dir: str | Path | None = None,
    source: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Generate, featurise and score ``sample_set`` (its options resolved against ``module``) on every rank of
    ``trainer`` (or alone); returns the record (set, reference, conventions, metrics) on every rank.

    ``samples_dir``: also write the images as parts keyed by this job (``source`` names what made them, e.g.
    the checkpoint and step) and merge exactly this set into ``samples_dir/samples.npz`` on rank 0."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    metrics = metrics or MetricOptions()
    reference.check(featurizer.identity)
    metric_settings_used(metrics, sample_set.num_samples, len(reference.features))  # too few: refused before sampling
    if sample_set.num_batches < world:
        raise ValueError(
            f"{sample_set.num_batches} batches of {sample_set.batch_size} cannot feed {world} devices: lower "
            "--fid.batch_size or raise --fid.num_samples (--fid.test_num_samples for `test`)"
        )
    sample_set = sample_set.with_options(sample_set.options.resolved(module.hparams))
    key = sample_set.job_key(source)
    start = time.perf_counter()
    batches = sample_set.rank_batches(rank, world)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"evaluating ({sample_set.num_samples} samples)")
    feats: dict[str, list[Tensor]] = {}
    for b in batches:
        images, labels = sample_batch(module, sample_set, b)
        reference.check(featurizer.identity, tuple(images.shape[-2:]))
        if samples_dir is not None:
            sample_set.write_part(samples_dir, key, b, images.permute(0, 2, 3, 1).numpy(), labels.numpy())
        for k, v in featurizer(images).items():
            feats.setdefault(k, []).append(v)
        feats.setdefault("index", []).append(sample_set.batch_index(b).double()[:, None])
    local = {k: torch.cat(v) for k, v in feats.items()}
    everything = _gathered(trainer, local)
    order = everything.pop("index")[:, 0].argsort()
    record: dict[str, Any] = {}
    if rank == 0:
        scores = compute_metrics({k: v[order] for k, v in everything.items()}, reference, metrics)
        record = {
            "sample_set": sample_set.record(),
            "settings": settings_of({**asdict(sample_set), **asdict(sample_set.options)}),
            **_reference_record(reference, featurizer, metrics, sample_set.num_samples),
            "metrics": scores,
            "seconds": round(time.perf_counter() - start, 1),
            "world_size": world,
        }
    if trainer is not None and world > 1:
        record = trainer.strategy.broadcast(record, src=0)
    if samples_dir is not None:
        if trainer is not None:
            trainer.strategy.barrier()
        if rank == 0:
            record["samples"] = str(sample_set.merge(samples_dir, key))
    return record


def _reference_record(
    reference: Reference, featurizer: Featurizer, metrics: MetricOptions, num_samples: int
) -> dict[str, Any]:
    """The feature extractor (name and the sha256 of its weights file), the reference (what made it, and hashes of
    its statistics and of all its arrays), and the conventions: as configured, and as ``used`` on this many samples
    (k, subsets)."""
    used = metric_settings_used(metrics, num_samples, len(reference.features))
    return {
        "feature_extractor": reference.meta["feature_extractor"],
        "feature_weights_file_sha256": featurizer.weights_file_sha256,
        "reference": {**reference.meta, "statistics_sha256": reference.statistics_sha256},
        "reference_sha256": reference.sha256,
        "conventions": {**asdict(metrics), "description": CONVENTIONS_NOTE[metrics.convention], "used": used},
    }


SETTINGS = ("sampler", "steps", "cfg_scale", "guidance_mode", "eta", "num_samples", "batch_size", "seed", "labels")


def settings_of(job: dict[str, Any]) -> dict[str, Any]:
    """A record's ``settings``: how the samples were drawn (sampling options, count, batches, seed, labels)."""
    return {key: job.get(key) for key in SETTINGS}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_job_of(samples: str | Path, count: int) -> dict[str, Any] | None:
    """The ``samples.json`` that ``dico sample`` wrote beside ``samples`` (what made them), when it describes a file of
    ``count`` samples; None otherwise."""
    meta = Path(samples).with_name("samples.json")
    if not meta.is_file():
        return None
    job = json.loads(meta.read_text())
    return job if job.get("num_samples") == count else None


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def score_npz(
    samples: str | Path,
    reference: Reference,
    featurizer: Featurizer,
    metrics: MetricOptions | None = None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Metrics of an ADM-format sample file (e.g. from ``dico sample``), streamed in batches. The reference is
    checked against the extractor and the file's resolution (read from its header) first. The record carries the
    file's sha256 and, from the ``samples.json`` beside it, what made the samples: ``settings`` (sampler, steps,
    guidance, labels ...) and ``sample_job`` (the checkpoint or release too)."""
    metrics = metrics or MetricOptions()
    shape = npz_images_shape(samples)
    reference.check(featurizer.identity, tuple(shape[1:3]))
    metric_settings_used(metrics, shape[0], len(reference.features))  # too few samples: refused before featurising
    feats = featurizer.run(iter_npz_images(samples, batch_size))
    scores = compute_metrics(feats, reference, metrics)
    job = sample_job_of(samples, int(shape[0]))
    return {
        "samples": str(samples),
        "samples_sha256": file_sha256(samples),
        "count": int(shape[0]),
        "settings": settings_of(job) if job else None,  # None: no samples.json of this file beside it
        "sample_job": job,
        **_reference_record(reference, featurizer, metrics, shape[0]),
        "metrics": scores,
    }
