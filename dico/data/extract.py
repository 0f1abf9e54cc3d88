"""Encode an image folder into a sharded latent cache (see :mod:`dico.data.manifest` for the layout).

Safe to run on many processes (``torchrun`` or a SLURM array: each rank encodes the shards ``s`` with
``s % world_size == rank`` and writes only those files), resumable, and an image that cannot be read is reported
in its shard's record and skipped, never failing the run.

Each shard records what made it. On resume a finished shard is kept only if it was made with the same VAE
(id and weights), image size, flips, dtype and scale factor -- otherwise the run stops rather than mix two
encodings in one cache -- and from the same list of images; a shard whose images changed (files added or
removed) is encoded again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .manifest import (
    MANIFEST,
    MUST_MATCH,
    Manifest,
    ShardRecord,
    atomic_write_text,
    images_sha256,
    sha256_file,
    shard_stem,
)
from .vae import DEFAULT_VAE, encode_moments, load_vae, vae_location, vae_scale_factor, vae_weights_sha256

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jpe", ".gif")


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while possible, resize the short side to ``size`` (bicubic),
    then crop the center ``size`` x ``size``."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def list_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image under ``root/<class>/``, classes and files sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-path {root} is not a folder of class folders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders: expected {root}/<class name>/<image files>")
    items = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items, classes


class _ImageList(Dataset):
    def __init__(self, items: Sequence[tuple[str, int]], size: int) -> None:
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, str]:
        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                img = center_crop_arr(img.convert("RGB"), self.size)
        except Exception as e:  # any unreadable file is reported and skipped
            return None, label, path, f"{type(e).__name__}: {e}"
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return x, label, path, ""


def _collate(batch: list[tuple[Any, int, str, str]]) -> tuple[torch.Tensor | None, torch.Tensor, list[dict[str, str]]]:
    good = [(x, y) for x, y, _, err in batch if x is not None]
    bad = [{"path": p, "error": err} for x, _, p, err in batch if x is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


@dataclass
class ExtractConfig:
    data_path: str
    out: str
    image_size: int = 256
    vae: str = DEFAULT_VAE
    batch_size: int = 32
    shard_size: int = 10_000
    num_workers: int = 4
    flips: bool = True
    dtype: str = "float32"
    device: str = "auto"
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True


def _shard_done(out: Path, index: int) -> ShardRecord | None:
    record = out / f"{shard_stem(index)}.json"
    if not record.exists():
        return None
    try:
        rec = ShardRecord(**json.loads(record.read_text()))
    except (ValueError, TypeError):
        return None  # a broken record: redo the shard
    lat = out / f"{rec.stem}.latents.npy"
    lab = out / f"{rec.stem}.labels.npy"
    return rec if lat.exists() and lab.exists() else None


def _rank_and_world(cfg: ExtractConfig) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = (
        cfg.world_size
        if cfg.world_size is not None
        else int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    )
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return rank, world


def _device(cfg: ExtractConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _check_made_with(out: Path, record: ShardRecord, made_with: dict[str, Any]) -> None:
    """Refuse a finished shard made with other settings: the cache would mix two encodings."""
    differ = {k: (record.made_with.get(k), made_with[k]) for k in MUST_MATCH if record.made_with.get(k) != made_with[k]}
    if differ:
        what = "; ".join(f"{k}: {old!r} in the cache, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(
            f"{out / record.stem}.json was made with other settings ({what}). One cache holds one encoding: pass a "
            f"new --out for these settings, or rerun with the cache's settings to resume it"
        )


def extract_latents(cfg: ExtractConfig) -> Manifest | None:
    """Encode this rank's unfinished shards; returns the manifest once every shard of the cache is done."""
    if cfg.image_size <= 0 or cfg.image_size % 8:
        raise ValueError(
            f"--image-size must be a positive multiple of 8 (the VAE downsamples by 8), got {cfg.image_size}"
        )
    for name, least in {"batch_size": 1, "shard_size": 1, "num_workers": 0}.items():
        if getattr(cfg, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(cfg, name)}")
    dtype = np.dtype(cfg.dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"--dtype must be float32 or float16, got {cfg.dtype}")
    items, classes = list_image_folder(cfg.data_path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_and_world(cfg)
    n_shards = -(-len(items) // cfg.shard_size)

    device = _device(cfg)
    vae = load_vae(cfg.vae, device)  # also to check finished shards against its weights
    made_with = {
        "vae": vae_location(cfg.vae),
        "vae_sha256": vae_weights_sha256(vae),
        "image_size": cfg.image_size,
        "flips": 2 if cfg.flips else 1,
        "dtype": cfg.dtype,
        "scale_factor": vae_scale_factor(vae),
    }
    todo = []
    for s in range(rank, n_shards, world):
        shard_items = items[s * cfg.shard_size : (s + 1) * cfg.shard_size]
        record = _shard_done(out, s)
        if record is not None and record.made_with:
            _check_made_with(out, record, made_with)
        if record is None or record.images_sha256 != images_sha256(shard_items, cfg.data_path):
            if record is not None:
                print(f"[dico extract] the images of {record.stem} changed since it was encoded; encoding it again")
            todo.append(s)

    if todo:
        progress = None
        if cfg.progress:
            from tqdm.auto import tqdm

            total = sum(min(cfg.shard_size, len(items) - s * cfg.shard_size) for s in todo)
            progress = tqdm(total=total, desc=f"extract (rank {rank}/{world})", unit="img")
        for s in todo:
            shard_items = items[s * cfg.shard_size : (s + 1) * cfg.shard_size]
            _encode_shard(cfg, vae, device, shard_items, s, out, dtype, progress, made_with)
        if progress is not None:
            progress.close()
    return finalize_manifest(cfg, classes, n_shards, items)


def _encode_shard(
    cfg: ExtractConfig,
    vae: Any,
    device: torch.device,
    items: Sequence[tuple[str, int]],
    index: int,
    out: Path,
    dtype: np.dtype,
    progress: Any,
    made_with: dict[str, Any],
) -> None:
    loader = DataLoader(
        _ImageList(items, cfg.image_size), batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_collate
    )
    latents, labels, skipped = [], [], []
    for x, y, bad in loader:
        skipped += bad
        if x is not None:
            x = x.to(device)
            views = torch.cat([x, x.flip(-1)]) if cfg.flips else x
            mean, std = encode_moments(vae, views)
            f = 2 if cfg.flips else 1
            moments = torch.stack([mean, std], dim=1)  # (f*B, 2, C, h, w)
            moments = moments.view(f, x.shape[0], *moments.shape[1:]).transpose(0, 1)  # (B, f, 2, C, h, w)
            latents.append(moments.float().cpu().numpy().astype(dtype))
            labels.append(y.numpy())
        if progress is not None:
            progress.update(len(bad) + (0 if x is None else x.shape[0]))
    stem = shard_stem(index)
    lat_path, lab_path = out / f"{stem}.latents.npy", out / f"{stem}.labels.npy"
    lat = np.concatenate(latents) if latents else np.zeros((0, 2 if cfg.flips else 1, 2, 4, 1, 1), dtype)
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    for path, arr in ((lat_path, lat), (lab_path, lab.astype(np.int64))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    shape = list(lat.shape[3:]) if len(lab) else []  # an all-unreadable shard has no latent shape
    record = ShardRecord(
        index,
        len(lab),
        sha256_file(lat_path),
        sha256_file(lab_path),
        skipped,
        shape,
        made_with=made_with,
        images_sha256=images_sha256(list(items), cfg.data_path),
    )
    atomic_write_text(out / f"{stem}.json", json.dumps(asdict(record)))
    for bad in skipped:
        print(f"[dico extract] skipped unreadable image {bad['path']}: {bad['error']}")


def finalize_manifest(
    cfg: ExtractConfig, classes: list[str], n_shards: int, items: Sequence[tuple[str, int]]
) -> Manifest | None:
    """Write ``manifest.json`` when every shard has its record, all made with the same settings from the current
    image list (whichever rank finishes last does it)."""
    out = Path(cfg.out)
    records, shapes = [], set()
    for s in range(n_shards):
        rec = _shard_done(out, s)
        shard_items = list(items[s * cfg.shard_size : (s + 1) * cfg.shard_size])
        if rec is None or rec.images_sha256 != images_sha256(shard_items, cfg.data_path):
            return None  # another rank still has it to (re)do
        if rec.count:
            shapes.add(tuple(rec.latent_shape))
        records.append(rec)
    for rec in records[1:]:
        _check_made_with(out, rec, records[0].made_with)
    if len(shapes) > 1:
        raise ValueError(
            f"shards in {out} disagree on the latent shape {sorted(shapes)}: they come from different runs"
        )
    made_with = records[0].made_with
    manifest = Manifest(
        vae=made_with["vae"],
        scale_factor=made_with["scale_factor"],
        image_size=made_with["image_size"],
        latent_shape=list(shapes.pop()) if shapes else [],
        num_classes=len(classes),
        class_names=classes,
        flips=made_with["flips"],
        dtype=made_with["dtype"],
        shards=records,
        vae_sha256=made_with["vae_sha256"],
    )
    manifest.save(out)
    return manifest


__all__ = ["MANIFEST", "ExtractConfig", "center_crop_arr", "extract_latents", "list_image_folder"]
