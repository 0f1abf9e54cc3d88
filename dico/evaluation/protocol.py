"""The evaluation protocol: generate a class-balanced sample set with the EMA weights, shard it over ranks,
extract features, gather them, and score them against reference statistics.

Sample i has class ``i % num_classes``; samples are made in fixed batches of ``batch_size`` whose noise is
seeded by their first index, and batch b runs on rank ``b % world_size``: the same checkpoint and settings give
the same images, hence the same metrics, on any number of devices.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .fidelity import (
    FeatureSpec,
    Reference,
    build_feature_extractor,
    compute_metrics,
    extract_features,
    feature_names,
    reference_from_features,
)
from .images import save_npz, to_uint8


@dataclass
class EvalSettings:
    """What a sample set is: its size and batch layout, sampler, guidance and seed (None: the module's default)."""

    num_samples: int = 1000
    batch_size: int = 64
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance_mode: str | None = None
    seed: int = 0

    def resolved(self, module: Any) -> dict[str, Any]:
        hp = module.hparams
        return {
            **asdict(self),
            "sampler": self.sampler or hp.sampler,
            "steps": self.steps or hp.sampling_steps,
            "cfg_scale": hp.cfg_scale if self.cfg_scale is None else self.cfg_scale,
            "guidance_mode": self.guidance_mode or hp.guidance_mode,
        }


def sample_batch(module: Any, index: Tensor, settings: EvalSettings) -> Tensor:
    """uint8 (B, C, H, W) images of the samples ``index`` (consecutive, starting a batch)."""
    labels = index % module.model.num_classes
    images = module.sample(
        labels, cfg_scale=settings.cfg_scale, guidance_mode=settings.guidance_mode, steps=settings.steps,
        sampler=settings.sampler, seed=settings.seed * 1_000_003 + int(index[0]),
    )  # fmt: skip
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)


def rank_batches(settings: EvalSettings, rank: int, world_size: int) -> list[Tensor]:
    n = settings.num_samples
    starts = range(0, n, settings.batch_size)
    return [torch.arange(s, min(s + settings.batch_size, n)) for b, s in enumerate(starts) if b % world_size == rank]


def _gather(trainer: Any, local: dict[str, Tensor], index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """All ranks' features, ordered by sample index (ranks hold different counts: pad, gather, trim)."""
    if trainer is None or trainer.world_size == 1:
        order = index.argsort()
        return {k: v[order] for k, v in local.items()}, index[order]
    strategy = trainer.strategy
    counts = strategy.all_gather(torch.tensor([len(index)], device=strategy.root_device)).flatten().tolist()
    longest = max(counts)

    def gather(t: Tensor) -> Tensor:
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype)
        padded[: len(t)] = t
        out = strategy.all_gather(padded.to(strategy.root_device)).cpu()
        return torch.cat([out[r, : counts[r]] for r in range(len(counts))])

    all_index = gather(index)
    order = all_index.argsort()
    return {k: gather(v)[order] for k, v in local.items()}, all_index[order]


def evaluate(
    module: Any,
    settings: EvalSettings,
    reference: Reference,
    spec: FeatureSpec,
    trainer: Any = None,
    samples_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate, featurise and score a sample set on every rank of ``trainer`` (or alone); returns the record
    (settings, reference hash, metrics) on every rank. ``samples_dir``: also write the images as resumable parts
    and, on rank 0, one ADM-format ``samples.npz``."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    if reference.meta.get("feature_extractor") != spec.name:
        raise ValueError(
            f"the reference statistics were computed with {reference.meta.get('feature_extractor')!r} features, "
            f"the evaluation uses {spec.name!r}: recompute the reference or change feature_extractor"
        )
    extractor = build_feature_extractor(spec, _requested(spec), module.device)
    layers = feature_names(extractor)
    start = time.perf_counter()
    batches = rank_batches(settings, rank, world)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"evaluating ({settings.num_samples} samples)")
    feats: dict[str, list[Tensor]] = {}
    for index in batches:
        images = sample_batch(module, index, settings)
        if samples_dir is not None:
            save_npz(Path(samples_dir) / "parts" / f"{int(index[0]):09d}.npz",
                     images.permute(0, 2, 3, 1).numpy(), (index % module.model.num_classes).numpy())  # fmt: skip
        for k, v in extract_features(extractor, images).items():
            feats.setdefault(k, []).append(v)
    local = {k: torch.cat(v) for k, v in feats.items()} if feats else {k: torch.zeros(0) for k in set(layers.values())}
    index = torch.cat(list(rank_batches(settings, rank, world)) or [torch.zeros(0, dtype=torch.long)])
    everything, _ = _gather(trainer, local, index)
    metrics = compute_metrics(everything, reference, layers)
    record = {
        "settings": settings.resolved(module),
        "feature_extractor": spec.name,
        "reference": reference.meta,
        "reference_sha256": reference.sha256,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 1),
        "world_size": world,
    }
    if samples_dir is not None and rank == 0:
        if trainer is not None:
            trainer.strategy.barrier()
        from dico.callbacks.sample_writer import merge_parts

        record["samples"] = str(merge_parts(samples_dir))
    elif samples_dir is not None and trainer is not None:
        trainer.strategy.barrier()
    return record


def _requested(spec: FeatureSpec) -> list[str]:
    return ["2048", "logits_unbiased"] if spec.name == "inception-v3-compat" else ["64", "logits"]


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def compute_reference(
    source: str, spec: FeatureSpec, image_size: int | None = None, max_features: int = 50_000, batch_size: int = 100,
    device: str = "cpu",
) -> Reference:  # fmt: skip
    """Reference statistics from an image folder (ADM center crop to ``image_size``), an ADM ``.npz`` reference
    batch, or ``digits`` (scikit-learn's digits, for the quickstart)."""
    extractor = build_feature_extractor(spec, _requested(spec), device)
    layer = feature_names(extractor)["fid"]
    if source == "digits":
        from dico.data.datamodule import load_digits_arrays

        images = torch.from_numpy(((load_digits_arrays()[0] + 1) * 127.5).round().astype(np.uint8))
        feats = extract_features(extractor, images, batch_size)[layer]
    elif source.endswith(".npz"):
        from .images import load_npz

        feats = extract_features(extractor, load_npz(source)[0], batch_size)[layer]
    else:
        feats = _folder_features(source, extractor, layer, image_size, batch_size)
    reference = reference_from_features(feats, spec, source, max_features)
    reference.meta["image_size"] = image_size
    return reference


def _folder_features(root: str, extractor: Any, layer: str, image_size: int | None, batch_size: int) -> Tensor:
    from PIL import Image

    from dico.data.extract import center_crop_arr, list_image_folder

    items, _ = list_image_folder(root)
    out, chunk = [], []
    for path, _label in items:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                arr = np.asarray(center_crop_arr(img, image_size) if image_size else img)
        except Exception as e:
            print(f"[dico reference] skipped unreadable image {path}: {e}")
            continue
        chunk.append(arr)
        if len(chunk) == batch_size:
            out.append(extract_features(extractor, np.stack(chunk), batch_size)[layer])
            chunk = []
    if chunk:
        out.append(extract_features(extractor, np.stack(chunk), batch_size)[layer])
    return torch.cat(out)


def score_npz(samples: str | Path, reference: Reference, spec: FeatureSpec, device: str = "cpu") -> dict[str, Any]:
    """Metrics of an ADM-format sample file (e.g. from ``dico sample``) against reference statistics."""
    from .images import load_npz

    images, _ = load_npz(samples)
    extractor = build_feature_extractor(spec, _requested(spec), device)
    layers = feature_names(extractor)
    metrics = compute_metrics(extract_features(extractor, images), reference, layers)
    return {"samples": str(samples), "count": len(images), "feature_extractor": spec.name,
            "reference": reference.meta, "reference_sha256": reference.sha256, "metrics": metrics}  # fmt: skip
