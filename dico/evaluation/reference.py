"""The reference side of the metrics, computed once and cached: FID and sFID statistics, and a seeded random
subset of reference features for precision/recall and KID.

From an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``, ``VIRTUAL_imagenet512.npz``) the statistics
are the batch's own ``mu``/``sigma`` and ``mu_s``/``sigma_s`` (over the whole training set, as ADM's evaluator and
so the paper use them) and the features are those of its 10,000 images (``arr_0``). From an image folder or
``digits`` all of them come from the images. The file records what made it (source, extractor, weights hash,
resolution), and :meth:`Reference.check` refuses a mismatch before any sample is featurised.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .fidelity import Featurizer, gaussian_statistics

FORMAT = 2  # 2: sFID statistics, weights hash, resolution


class OutdatedReference(ValueError):
    """A reference file of an older dico format: recompute it."""


@dataclass
class Reference:
    """FID statistics (``mu``, ``sigma``), sFID statistics (``mu_s``, ``sigma_s``), float64, and (N, D)
    float32 reference ``features`` for precision/recall and KID; ``meta`` says what made them."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    features: np.ndarray
    meta: dict[str, Any]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.mu, self.sigma, self.mu_s, self.sigma_s, self.features):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def check(self, identity: dict[str, str], image_size: tuple[int, int] | None = None) -> None:
        """Raise (naming the fix) unless the reference was made with this extractor and weights and, when
        ``image_size`` (H, W) is given, at that resolution."""
        made_with = {k: self.meta.get(k) for k in identity}
        if made_with != identity:
            raise ValueError(
                f"the reference {self.meta.get('path', '')} was computed with {made_with}, this evaluation uses "
                f"{identity}: recompute it with `python cli.py reference --overwrite` and the same "
                "--feature_extractor/--weights_path, or point weights_path at the file the reference was made with"
            )
        ref_size = self.meta.get("image_size")
        if image_size is not None and ref_size is not None and tuple(image_size) != tuple(ref_size):
            raise ValueError(
                f"the samples are {image_size[0]}x{image_size[1]}, the reference {self.meta.get('source')} is "
                f"{ref_size[0]}x{ref_size[1]}: use the reference of the samples' resolution (ADM's "
                f"VIRTUAL_imagenet{image_size[0]}*.npz) or sample at {ref_size[0]}"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, mu_s=self.mu_s, sigma_s=self.sigma_s, features=self.features,
                     meta=np.array(json.dumps(self.meta)))  # fmt: skip
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        path = Path(path)
        make = f"`python cli.py reference --source IMAGES_OR_ADM_NPZ --out {path}`"
        if not path.exists():
            raise FileNotFoundError(f"reference statistics {path} do not exist; compute them once with {make}")
        try:
            d = np.load(path, allow_pickle=False)
            keys = set(d.files)
        except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as e:  # truncated, not a .npz, a bare .npy
            raise ValueError(f"{path} is not a dico reference-statistics file ({e}); recompute it with {make}") from e
        try:
            with d:
                if "arr_0" in keys and "meta" not in keys:
                    raise ValueError(
                        f"{path} is an ADM reference batch, not dico reference statistics: make them from it with "
                        f"`python cli.py reference --source {path} --out REF.npz` and pass REF.npz"
                    )
                meta = json.loads(str(d["meta"]))
                if meta.get("format") != FORMAT:
                    raise OutdatedReference(
                        f"{path} is an older dico reference (no sFID statistics); recompute it with {make} --overwrite"
                    )
                arrays = {k: d[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "features")}
        except (KeyError, OSError) as e:
            raise ValueError(f"{path} is not a dico reference-statistics file ({e}); recompute it with {make}") from e
        return cls(**arrays, meta={**meta, "path": str(path)})


def subsample(features: Tensor, max_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of at most ``max_features`` rows (in their original order) and its indices: a
    class-ordered folder keeps all its classes."""
    n = len(features)
    keep = np.arange(n) if n <= max_features else np.sort(np.random.default_rng(seed).choice(n, max_features, False))
    return features.numpy()[keep], keep


def compute_reference(
    source: str,
    featurizer: Featurizer,
    image_size: int | None = None,
    max_features: int = 50_000,
    seed: int = 0,
    batch_size: int = 100,
) -> Reference:
    """Reference statistics from an ADM ``.npz`` reference batch, an image folder (ADM center crop to
    ``image_size``) or ``digits`` (scikit-learn's digits, for the quickstart).

    Args:
        max_features: reference features kept for precision/recall and KID (a seeded random subset, ``seed``).
    """
    adm_stats = None
    if source == "digits":
        from dico.data.datamodule import load_digits_arrays

        images = ((load_digits_arrays()[0] + 1) * 127.5).round().astype(np.uint8)
        images = torch.from_numpy(images)
        feats = featurizer.run(images.split(batch_size))
        size = tuple(images.shape[-2:])
    elif source.endswith(".npz"):
        from .images import iter_npz_images, npz_images_shape

        size = tuple(npz_images_shape(source)[1:3])
        with np.load(source, allow_pickle=False) as d:
            if {"mu", "sigma", "mu_s", "sigma_s"} <= set(d.files):
                adm_stats = {k: np.asarray(d[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")}
        feats = featurizer.run(iter_npz_images(source, batch_size))
    else:
        if image_size is None:
            raise ValueError("a reference from an image folder needs --image_size (the ADM center crop, e.g. 256)")
        feats = featurizer.run(_folder_batches(source, image_size, batch_size))
        size = (image_size, image_size)
    if adm_stats is None:
        mu, sigma = gaussian_statistics(feats["pool"])
        mu_s, sigma_s = gaussian_statistics(feats["spatial"])
        statistics = f"computed from the {len(feats['pool'])} images"
    else:
        mu, sigma, mu_s, sigma_s = (adm_stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s"))
        if mu.shape != (feats["pool"].shape[1],) or mu_s.shape != (feats["spatial"].shape[1],):
            raise ValueError(
                f"{source}: mu {mu.shape} / mu_s {mu_s.shape} do not match the {featurizer.spec.name} features "
                f"({feats['pool'].shape[1]} / {feats['spatial'].shape[1]}): ADM batches need inception-v3-compat"
            )
        statistics = "the batch's own mu/sigma and mu_s/sigma_s (ADM)"
    kept, _ = subsample(feats["pool"], max_features, seed)
    meta = {
        "format": FORMAT, "source": str(source), **featurizer.identity, "image_size": list(size),
        "count": len(feats["pool"]), "statistics": statistics, "features_kept": len(kept), "subsample_seed": seed,
    }  # fmt: skip
    return Reference(mu, sigma, mu_s, sigma_s, kept, meta)


def _folder_batches(root: str, image_size: int, batch_size: int):  # type: ignore[no-untyped-def]
    from PIL import Image

    from dico.data.extract import center_crop_arr, list_image_folder

    items, _ = list_image_folder(root)
    chunk = []
    for path, _label in items:
        try:
            with Image.open(path) as img:
                chunk.append(np.asarray(center_crop_arr(img.convert("RGB"), image_size)))
        except Exception as e:
            print(f"[dico reference] skipped unreadable image {path}: {e}")
            continue
        if len(chunk) == batch_size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)
