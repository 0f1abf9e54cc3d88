"""The manifest of a latent cache: what was encoded, how, and where the shards are.

A cache folder holds ``manifest.json`` plus shards ``shard-NNNNN.latents.npy`` (K, F, 2, C, H, W) -- for each
image its F flips (1, or 2 with the horizontal mirror) and for each the VAE posterior mean and std -- and
``shard-NNNNN.labels.npy`` (K,) int64. Each finished shard also has a ``shard-NNNNN.json`` record (count,
checksums, skipped images, and what made it: VAE id and weights hash, image size, flips, dtype, scale factor, and a
hash of its list of images); the manifest is assembled from those records once every shard is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "dico-latents/1"
MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardRecord:
    """One finished shard: its images, their count and checksums, the images that could not be read, and
    ``made_with``: the extraction settings (:data:`MADE_WITH` keys) and ``images_sha256``, the hash of its image list.
    Records written before provenance was recorded have an empty ``made_with``."""

    index: int
    count: int
    latents_sha256: str
    labels_sha256: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    latent_shape: list[int] = field(default_factory=list)
    made_with: dict[str, Any] = field(default_factory=dict)
    images_sha256: str = ""

    @property
    def stem(self) -> str:
        return shard_stem(self.index)


MADE_WITH = ("vae", "vae_sha256", "image_size", "flips", "dtype", "scale_factor")
"""What a shard records about how it was made."""
MUST_MATCH = MADE_WITH[1:]
"""The settings shards of one cache must share (the VAE by its weights: another path to the same VAE is fine)."""


def images_sha256(items: list[tuple[str, int]], root: str | Path) -> str:
    """Hash of a shard's image list: (path relative to the image folder, label) pairs in order."""
    rel = [[os.path.relpath(path, root), label] for path, label in items]
    return hashlib.sha256(json.dumps(rel).encode()).hexdigest()


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass
class Manifest:
    """Everything a reader needs to trust and interpret a latent cache."""

    vae: str
    scale_factor: float
    image_size: int
    latent_shape: list[int]
    num_classes: int
    class_names: list[str]
    flips: int
    dtype: str
    shards: list[ShardRecord]
    vae_sha256: str = ""  # sha256 of the VAE's weights (its state dict); empty in caches made before it was kept
    format: str = FORMAT

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["count"] = self.count
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data.pop("count", None)
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest (format {data.get('format')!r}); re-run `dico extract`")
        data["shards"] = [ShardRecord(**s) for s in data["shards"]]
        return cls(**data)

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"no {MANIFEST} in {root}: extraction has not finished there. "
                f"Run (or resume) `python cli.py extract --data-path IMAGES --out {root}`"
            )
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{path} is corrupt ({e}); delete it and re-run `dico extract` to rebuild it") from e

    def save(self, root: str | Path) -> None:
        atomic_write_text(Path(root) / MANIFEST, self.to_json())
