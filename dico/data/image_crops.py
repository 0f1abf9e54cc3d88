"""Small crops of the images bundled in scikit-image's wheel: a spatial pixel-space proxy (class = source image).

Each image is cut into two disjoint regions: its right-most ``heldout_fraction`` of columns holds the held-out
crops (fixed, non-overlapping tiles on a grid), the rest the training crops (positions drawn once with
``crop_seed``, overlapping freely). No training crop shares a pixel with a held-out crop, so a held-out score
measures generalisation to unseen parts of each image, not memorisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .datamodule import ArrayDataModule
from .latents import InMemoryLatents, LatentArrays

#: Grayscale images that ship inside scikit-image's wheel (no download): textures, text and natural scenes.
IMAGES = ("brick", "grass", "gravel", "text", "coins", "camera", "moon", "page", "clock", "cell")


@dataclass(frozen=True)
class CropSplit:
    """Training and held-out crops: x (N, 1, S, S) float32 in [-1, 1], y (N,) int64 (the image's index in
    ``images``), and each crop's (row, column) corner in its image, (N, 2) int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    train_corners: np.ndarray
    heldout_x: np.ndarray
    heldout_y: np.ndarray
    heldout_corners: np.ndarray


def load_image(name: str) -> np.ndarray:
    """A bundled scikit-image image as (H, W) uint8 (never downloads: only names of :data:`IMAGES` are read)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {image.dtype} {image.shape}, not a grayscale uint8 image")
    return image


def heldout_column(width: int, crop_size: int, heldout_fraction: float) -> int:
    """The first column of an image's held-out region (a multiple of ``crop_size`` from the right edge)."""
    tiles = max(1, round(width * heldout_fraction / crop_size))
    start = width - tiles * crop_size
    if start < crop_size:
        raise ValueError(f"an image {width} px wide leaves no training region for {crop_size} px crops")
    return start


def _to_pixels(crops: list[np.ndarray]) -> np.ndarray:
    return (np.stack(crops).astype(np.float32)[:, None] / 127.5 - 1.0).astype(np.float32)


def image_crops(
    images: tuple[str, ...] = IMAGES,
    crop_size: int = 16,
    train_per_image: int = 4096,
    heldout_per_image: int = 64,
    heldout_fraction: float = 0.25,
    crop_seed: int = 0,
) -> CropSplit:
    """Crops of every image in ``images``: ``train_per_image`` at seeded random positions of its training region
    and ``heldout_per_image`` tiles of its held-out region (evenly spread over the grid of tiles, no randomness)."""
    rng = np.random.default_rng(crop_seed)
    parts: dict[str, list[Any]] = {k: [] for k in ("tx", "ty", "tc", "hx", "hy", "hc")}
    for label, name in enumerate(images):
        image = load_image(name)
        h, w = image.shape
        start = heldout_column(w, crop_size, heldout_fraction)
        # training: any corner whose crop lies left of the held-out region
        rows = rng.integers(0, h - crop_size + 1, train_per_image)
        cols = rng.integers(0, start - crop_size + 1, train_per_image)
        parts["tx"] += [image[r : r + crop_size, c : c + crop_size] for r, c in zip(rows, cols, strict=True)]
        parts["tc"].append(np.stack([rows, cols], 1))
        parts["ty"].append(np.full(train_per_image, label))
        # held-out: tiles of the held-out region, evenly spaced over the tile grid
        grid = [
            (r, c) for r in range(0, h - crop_size + 1, crop_size) for c in range(start, w - crop_size + 1, crop_size)
        ]
        if heldout_per_image > len(grid):
            raise ValueError(f"{name}: {heldout_per_image} held-out crops asked, its held-out region has {len(grid)}")
        pick = np.linspace(0, len(grid) - 1, heldout_per_image).round().astype(int)
        corners = np.asarray([grid[i] for i in pick], dtype=np.int64)
        parts["hx"] += [image[r : r + crop_size, c : c + crop_size] for r, c in corners]
        parts["hc"].append(corners)
        parts["hy"].append(np.full(heldout_per_image, label))
    return CropSplit(
        _to_pixels(parts["tx"]),
        np.concatenate(parts["ty"]).astype(np.int64),
        np.concatenate(parts["tc"]),
        _to_pixels(parts["hx"]),
        np.concatenate(parts["hy"]).astype(np.int64),
        np.concatenate(parts["hc"]),
    )


class ImageCropsDataModule(ArrayDataModule):
    """scikit-image's bundled images (:data:`IMAGES`, one class each) as 1 x ``crop_size`` x ``crop_size`` pixel
    crops in [-1, 1]: training crops from the left part of every image, fixed held-out crops (the validation and
    test split, and the held-out score's set) from its right-most ``heldout_fraction`` of columns.

    ``crop_seed`` fixes the training crops' positions (the data, the same for every training seed); ``seed`` only
    orders the training batches. ``val_fraction`` is not used: the held-out split is the held-out region.
    """

    def __init__(
        self,
        images: tuple[str, ...] = IMAGES,
        crop_size: int = 16,
        train_per_image: int = 4096,
        heldout_per_image: int = 64,
        heldout_fraction: float = 0.25,
        crop_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.crop_args = dict(
            images=tuple(images),
            crop_size=crop_size,
            train_per_image=train_per_image,
            heldout_per_image=heldout_per_image,
            heldout_fraction=heldout_fraction,
            crop_seed=crop_seed,
        )
        self._num_train = len(images) * train_per_image

    def build_dataset(self) -> LatentArrays:
        crops = image_crops(**self.crop_args)  # type: ignore[arg-type]
        x = np.concatenate([crops.train_x, crops.heldout_x])
        y = np.concatenate([crops.train_y, crops.heldout_y])
        return InMemoryLatents(x, y, num_classes=len(self.crop_args["images"]))

    def split(self) -> tuple[Tensor, Tensor]:
        """(training indices, held-out indices): the dataset holds the training crops first."""
        n = len(self.data)
        return torch.arange(self._num_train), torch.arange(self._num_train, n)

    @property
    def decoder(self) -> dict[str, Any]:
        return {"kind": "pixels"}
