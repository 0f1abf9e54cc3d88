"""One reproducible sample set: what to draw (:class:`~dico.data.label_batches.LabelBatches`: layout, labels,
seeds), how (sampling options), and its files.

Each finished batch is one part file under ``<out>/parts/<job key>/``; :meth:`SampleSet.merge` streams exactly this
set's parts into one ADM-format ``samples.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dico.data.label_batches import LABEL_LAYOUTS, LabelBatches, SampleBatches
from dico.diffusion.options import SamplingOptions

__all__ = ["LABEL_LAYOUTS", "SampleBatches", "SampleSet", "SamplingOptions"]


@dataclass(frozen=True)
class SampleSet(LabelBatches):
    """A class-labelled, seeded sample set split into fixed batches (see :class:`LabelBatches` for the layout
    arguments) and drawn with ``options`` (resolve them against the module before recording a set)."""

    options: SamplingOptions = field(default_factory=SamplingOptions)

    def batch(self, b: int) -> dict[str, Any]:
        """Batch ``b``: sample ``index`` (B,), labels ``y`` (B,), its ``seed`` and the sampling ``options``."""
        return {**super().batch(b), "options": self.options.as_kwargs()}

    def with_options(self, options: SamplingOptions) -> SampleSet:
        return replace(self, options=options)

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "options": asdict(self.options)}

    def job_key(self, source: str) -> str:
        """A short hash of this set and what made it (``source``: checkpoint, step ...): names its part folder."""
        text = json.dumps({"set": self.record(), "source": source}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- files ----------------------------------------------------------------------------------------
    @staticmethod
    def parts_dir(out_dir: str | Path, key: str) -> Path:
        return Path(out_dir) / "parts" / key

    def part_path(self, out_dir: str | Path, key: str, b: int) -> Path:
        return self.parts_dir(out_dir, key) / f"{b * self.batch_size:09d}.npz"

    def write_part(self, out_dir: str | Path, key: str, b: int, images: np.ndarray, labels: np.ndarray) -> Path:
        """Batch ``b``'s uint8 (B, H, W, C) images and labels, written atomically (temp file, then rename)."""
        if len(images) != len(self.batch_index(b)) or len(labels) != len(images):
            raise ValueError(f"batch {b} has {len(self.batch_index(b))} samples, got {len(images)} images")
        path = self.part_path(out_dir, key, b)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")  # not *.npz: an interrupted write is never taken for a part
        with open(tmp, "wb") as f:
            np.savez(f, images, np.asarray(labels, dtype=np.int64))
        os.replace(tmp, path)
        return path

    def finished(self, out_dir: str | Path, key: str) -> set[int]:
        """Batches whose part file exists (a resumed job makes only the others)."""
        folder = self.parts_dir(out_dir, key)
        if not folder.exists():
            return set()
        done = set()
        for p in folder.glob("[0-9]*.npz"):
            first = int(p.stem)
            if first % self.batch_size == 0 and first < self.num_samples:
                done.add(first // self.batch_size)
        return done

    def iter_parts(self, out_dir: str | Path, key: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) of every batch in order; raises if a part is missing or has the wrong count."""
        missing = sorted(set(range(self.num_batches)) - self.finished(out_dir, key))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {self.num_batches} batches of this sample set are missing in "
                f"{self.parts_dir(out_dir, key)} (first: batch {missing[0]}); rerun the job to make them"
            )
        for b in range(self.num_batches):
            with np.load(self.part_path(out_dir, key, b), allow_pickle=False) as data:
                images, labels = data["arr_0"], data["arr_1"]
            if len(images) != len(self.batch_index(b)) or len(labels) != len(images):
                raise ValueError(
                    f"part {b} of {self.parts_dir(out_dir, key)} holds {len(images)} samples, "
                    f"expected {len(self.batch_index(b))}: delete it and rerun"
                )
            yield images, labels

    def merge(self, out_dir: str | Path, key: str, grid_size: int = 100) -> Path:
        """Stream this set's parts (exactly ``num_samples``, in index order) into ``<out_dir>/samples.npz``
        (ADM format: ``arr_0`` uint8 NHWC, ``arr_1`` int64 labels) and draw ``samples.png``; memory stays at
        one part whatever the set's size."""
        from .images import save_grid

        out_dir = Path(out_dir)
        first_images, _ = next(self.iter_parts(out_dir, key))
        shape, count = first_images.shape[1:], 0
        path, tmp = out_dir / "samples.npz", out_dir / ".samples.npz.tmp"
        labels = np.empty(self.num_samples, dtype=np.int64)
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (self.num_samples, *shape)}
                np.lib.format.write_array_header_1_0(f, header)
                for images, part_labels in self.iter_parts(out_dir, key):
                    if images.shape[1:] != shape or images.dtype != np.uint8:
                        raise ValueError(f"parts of {self.parts_dir(out_dir, key)} differ in shape or dtype")
                    f.write(np.ascontiguousarray(images).tobytes())
                    labels[count : count + len(images)] = part_labels
                    count += len(images)
            if count != self.num_samples:  # cannot happen after the per-part checks; never write a wrong file
                raise ValueError(f"merged {count} samples, the set has {self.num_samples}")
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels)
        os.replace(tmp, path)
        shown = torch.from_numpy(first_images[:grid_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        save_grid(out_dir / "samples.png", shown, nrow=max(1, int(len(shown) ** 0.5)))
        return path
