"""Image conversion and files: uint8 NHWC, ADM-format ``.npz`` sample files, PNG grids."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def npz_images_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of ``arr_0`` in an ADM-format ``.npz``, read from its header (no image is loaded); a file that is
    no such ``.npz`` raises a ``ValueError`` that says what it holds."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "arr_0.npy" not in names:
                raise ValueError(f"it holds {sorted(n.removesuffix('.npy') for n in names)}, no arr_0")
            with zf.open("arr_0.npy") as f:
                return _read_header(f)[0]
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"{path} is not an ADM-format sample file, a .npz whose arr_0 holds uint8 images (N, H, W, C) with 1 or "
            f"3 channels last ({e})"
        ) from e


def iter_npz_images(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, C) batches of ``arr_0`` streamed from an ADM-format ``.npz`` (memory: one batch), as ADM's
    evaluator reads its 50k x 512^2 sample files."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, dtype = _read_header(f)
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.frombuffer(f.read(n * per_image), dtype=dtype).reshape(n, *shape[1:])


def _read_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype != np.uint8 or len(shape) != 4:
        raise ValueError(f"arr_0 must be uint8 (N, H, W, C) in C order, got {dtype} {shape}")
    if shape[-1] not in (1, 3):
        raise ValueError(f"arr_0 has shape {shape}: channels go last, 1 or 3 of them (transpose NCHW to NHWC)")
    return shape, dtype
