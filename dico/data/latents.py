"""Batched readers of cached latents: memory-mapped shards, or arrays held in memory.

A reader returns whole batches, ``{"x": mean (B, C, H, W), "std": (B, C, H, W) | absent, "y": (B,)}``, already
multiplied by the latent scale factor. The training step draws ``x + std * eps`` from the VAE posterior.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .manifest import Manifest, sha256_file

ZEROED_COUNT = 8  # exact zeros in one posterior mean that mark a zeroed (corrupt) region of a shard


class LatentArrays(Dataset):
    """Base class: ``__getitems__`` takes sampler keys ``2 * index + flip`` and returns one batch dict."""

    flips: int = 1
    num_classes: int
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: np.ndarray, flip: np.ndarray) -> dict[str, Tensor]:
        raise NotImplementedError

    def __getitems__(self, keys: list[int]) -> dict[str, Tensor]:
        keys_arr = np.asarray(keys, dtype=np.int64)
        return self.read(keys_arr // 2, keys_arr % 2)

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def labels(self) -> np.ndarray:
        raise NotImplementedError


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Class labels must lie in ``[0, num_classes)``: the model reads ``num_classes`` itself as the null
    (unconditional) label, so a label equal to it would train silently as unconditional data."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{where} holds the class label {bad}, outside [0, {num_classes - 1}] ({num_classes} classes; "
            f"{num_classes} itself is the model's null label): relabel the data from 0 or raise num_classes"
        )


class InMemoryLatents(LatentArrays):
    """Arrays in memory, e.g. pixel-space images: x (N, C, H, W) float, y (N,) int; no posterior std."""

    def __init__(self, x: np.ndarray | Tensor, y: np.ndarray | Tensor, num_classes: int) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.num_classes = num_classes
        check_labels(self.y.numpy(), num_classes, "the data")
        self.shape = tuple(self.x.shape[1:])  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.y)

    def read(self, index: np.ndarray, flip: np.ndarray) -> dict[str, Tensor]:
        idx = torch.from_numpy(index)
        return {"x": self.x[idx], "y": self.y[idx]}

    def labels(self) -> np.ndarray:
        return self.y.numpy()


class ShardedLatents(LatentArrays):
    """A latent cache written by ``dico extract``, read through memory maps (no copy until a batch is read)."""

    def __init__(self, root: str | Path, verify_checksums: bool = False) -> None:
        self.root = Path(root)
        self.manifest = Manifest.load(self.root)
        m = self.manifest
        self.flips = m.flips
        self.num_classes = m.num_classes
        self.shape = tuple(m.latent_shape)  # type: ignore[assignment]
        self.scale = m.scale_factor
        self.offsets = np.cumsum([0] + [s.count for s in m.shards])
        self._latents: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        for shard in m.shards:
            if shard.count == 0:  # every image of the shard was unreadable
                self._latents.append(np.zeros((0, m.flips, 2, *m.latent_shape), np.float32))
                self._labels.append(np.zeros(0, np.int64))
                continue
            lat_path = self.root / f"{shard.stem}.latents.npy"
            lab_path = self.root / f"{shard.stem}.labels.npy"
            if verify_checksums:
                for path, digest in ((lat_path, shard.latents_sha256), (lab_path, shard.labels_sha256)):
                    if sha256_file(path) != digest:
                        raise ValueError(
                            f"{path} does not match its checksum in the manifest: the file is corrupt. "
                            f"Delete it and {shard.stem}.json, then re-run `dico extract` on the same folder "
                            "to rebuild only that shard"
                        )
            try:
                lat = np.load(lat_path, mmap_mode="r")
                lab = np.load(lab_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"cannot read {lat_path.name} or {lab_path.name} in {self.root} ({e}); delete that shard's "
                    "files and re-run `dico extract` to rebuild it"
                ) from e
            expected = (shard.count, m.flips, 2, *m.latent_shape)
            if lat.shape != expected or lab.shape != (shard.count,):
                raise ValueError(
                    f"{lat_path.name} has shape {lat.shape}, the manifest says {expected}: the shard is truncated "
                    "or from another extraction; delete it and re-run `dico extract`"
                )
            check_labels(np.asarray(lab), m.num_classes, f"{lab_path} (manifest: {m.num_classes} classes)")
            self._latents.append(lat)
            self._labels.append(lab)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, index: np.ndarray, flip: np.ndarray) -> dict[str, Tensor]:
        n = len(index)
        moments = np.empty((n, 2, *self.shape), dtype=np.float32)  # (B, mean|std, C, H, W)
        y = np.empty(n, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        flip = np.minimum(flip, self.flips - 1)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            local = index[rows] - self.offsets[s]
            order = np.argsort(local)  # ascending reads are kinder to the page cache
            rows, local = rows[order], local[order]
            moments[rows] = self._latents[s][local, flip[rows]]  # one fancy-indexed read per shard
            y[rows] = self._labels[s][local]
            self._check_sound(moments[rows], s, local)
        # numpy, not torch: one single-threaded pass, no thread-pool wake-ups in the loader process
        np.multiply(moments, np.float32(self.scale), out=moments)
        t = torch.from_numpy(moments)
        return {"x": t[:, 0], "std": t[:, 1], "y": torch.from_numpy(y)}

    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(lab) for lab in self._labels]) if self._labels else np.zeros(0, np.int64)

    def _check_sound(self, moments: np.ndarray, shard: int, local: np.ndarray) -> None:
        """Zeroed bytes (a lost page, a sparse file after a crash) keep a shard's size and shape, and so do NaN or inf
        (an encoding that overflowed, flipped bits); they are caught here, on the rows just read, without
        checksumming or a pass over the whole cache at start-up: the VAE's posterior std is never 0, and
        ``ZEROED_COUNT`` exact zeros in one posterior mean do not happen in a real encoding."""
        flat = moments.reshape(len(moments), 2, -1)  # (B, mean|std, C*H*W)
        not_finite = ~np.isfinite(flat).all(axis=(1, 2))
        zeroed = (flat[:, 1] == 0).any(axis=1) | ((flat[:, 0] == 0).sum(axis=1) >= min(ZEROED_COUNT, flat.shape[2]))
        bad = np.nonzero(not_finite | zeroed)[0]
        if len(bad):
            stem = self.manifest.shards[shard].stem
            what = "NaN or inf" if not_finite[bad[0]] else "zeroed bytes"
            raise ValueError(
                f"{self.root / stem}.latents.npy holds {what} (image {int(local[bad[0]])} of the shard): the file is "
                f"corrupt. Delete {stem}.latents.npy and {stem}.json, then re-run `dico extract` on the same folder "
                "to rebuild only that shard"
            )


def identity_collate(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The dataset already returns whole batches (``__getitems__``)."""
    return batch
