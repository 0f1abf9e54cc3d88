"""Image conversion and files: uint8 NHWC, ADM-format ``.npz`` sample files, PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounded as the ADM/DiT sample scripts do."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | Tensor | None = None) -> Path:
    """ADM-format samples: ``arr_0`` uint8 (N, H, W, C), ``arr_1`` int64 labels (if given). Written atomically."""
    path = Path(path)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"ADM samples are uint8 NHWC, got {images.dtype} {images.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, *arrays)
    tmp.replace(path)
    return path


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM-format sample or reference batch (``arr_0`` images, optional ``arr_1`` labels)."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} has no arr_0: not an ADM-format sample file")
        images = data["arr_0"]
        labels = data.get("arr_1", None)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images, labels


def save_grid(path: str | Path, images: Tensor, nrow: int, min_size: int = 64) -> Path:
    """A PNG grid of (B, C, H, W) images in [-1, 1]; tiny images are upscaled (nearest) to ``min_size``."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    if x.shape[-1] < min_size:
        x = torch.nn.functional.interpolate(x, scale_factor=max(1, min_size // x.shape[-1]), mode="nearest")
    save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)
    return path
