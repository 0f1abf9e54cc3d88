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
ADM_STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")
NO_SFID = "the batch's own mu/sigma (ADM); no sFID: sFID needs mu_s/sigma_s, which the batch lacks"


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
        """A hash of the statistics and the kept features."""
        return _arrays_sha256(self.mu, self.sigma, self.mu_s, self.sigma_s, self.features)

    @property
    def statistics_sha256(self) -> str:
        """A hash of the FID/sFID statistics alone: for an ADM batch its own ``mu``/``sigma``/``mu_s``/``sigma_s``,
        which do not depend on our feature extractor (the same number for every copy of the batch)."""
        return _arrays_sha256(self.mu, self.sigma, self.mu_s, self.sigma_s)

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

    def differences(
        self, source: str, identity: dict[str, str] | None = None, image_size: int | None = None
    ) -> list[str]:
        """What made this reference (source, extractor and weights, folder crop size) that differs from ``source``,
        ``identity`` (:attr:`Featurizer.identity`) and ``image_size``; empty when it is the reference asked for."""
        made = self.meta
        out = [] if same_source(made.get("source"), source) else [f"source {made.get('source')} (asked: {source})"]
        out += [f"{k} {made.get(k)} (asked: {v})" for k, v in (identity or {}).items() if made.get(k) != v]
        folder = source != "digits" and not source.endswith(".npz")
        if folder and image_size is not None and list(made.get("image_size") or []) != [image_size, image_size]:
            out.append(f"image size {made.get('image_size')} (asked: {image_size})")
        return out

    def check_made_by(self, source: str, identity: dict[str, str] | None, image_size: int | None, fix: str) -> None:
        """Raise, naming ``fix``, unless this reference was made from ``source`` with ``identity`` and ``image_size``
        (see :meth:`differences`)."""
        differ = self.differences(source, identity, image_size)
        if differ:
            raise ValueError(f"the reference {self.meta.get('path', '')} was made with {'; '.join(differ)}: {fix}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                mu=self.mu,
                sigma=self.sigma,
                mu_s=self.mu_s,
                sigma_s=self.sigma_s,
                features=self.features,
                meta=np.array(json.dumps(self.meta)),
            )
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
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, AttributeError) as e:  # empty, truncated, .npy
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


def _arrays_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def same_source(recorded: str | None, source: str) -> bool:
    """Whether a reference recorded as made from ``recorded`` was made from ``source``: the same path (or, for an
    ADM reference batch, the same file name: the batches are named by what they are)."""
    if recorded is None or recorded == source:
        return recorded is not None
    if "digits" in (recorded, source):
        return False
    a, b = Path(recorded), Path(source)
    return a.resolve() == b.resolve() or (a.suffix == b.suffix == ".npz" and a.name == b.name)


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
    check_source(source, image_size)
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
            adm_stats = {k: np.asarray(d[k], dtype=np.float64) for k in ADM_STATISTICS if k in d.files} or None
        feats = featurizer.run(iter_npz_images(source, batch_size))
    else:
        feats = featurizer.run(_folder_batches(source, image_size, batch_size))
        size = (image_size, image_size)
    if adm_stats is None:
        mu, sigma = gaussian_statistics(feats["pool"])
        mu_s, sigma_s = gaussian_statistics(feats["spatial"])
        statistics = f"computed from the {len(feats['pool'])} images"
    else:
        mu, sigma, mu_s, sigma_s = _adm_statistics(source, adm_stats, feats, featurizer.spec.name)
        statistics = "the batch's own mu/sigma and mu_s/sigma_s (ADM)" if len(mu_s) else NO_SFID
    kept, _ = subsample(feats["pool"], max_features, seed)
    meta = {
        "format": FORMAT,
        "source": str(source),
        **featurizer.identity,
        "image_size": list(size),
        "count": len(feats["pool"]),
        "statistics": statistics,
        "features_kept": len(kept),
        "subsample_seed": seed,
    }
    return Reference(mu, sigma, mu_s, sigma_s, kept, meta)


def _adm_statistics(
    source: str, stats: dict[str, np.ndarray], feats: dict[str, Tensor], extractor: str
) -> tuple[np.ndarray, ...]:
    """An ADM batch's ``mu``/``sigma`` and ``mu_s``/``sigma_s`` checked against the features; without the spatial
    pair, empty ``mu_s``/``sigma_s`` (no sFID)."""
    if not {"mu", "sigma"} <= set(stats):
        raise ValueError(
            f"{source} holds {sorted(stats)} without mu/sigma: an ADM reference batch has mu and sigma "
            "(and mu_s/sigma_s for sFID); pass the batch as published, or its images alone"
        )
    mu, sigma = stats["mu"], stats["sigma"]
    mu_s, sigma_s = stats.get("mu_s", np.zeros(0)), stats.get("sigma_s", np.zeros((0, 0)))
    if mu.shape != (feats["pool"].shape[1],) or (len(mu_s) and mu_s.shape != (feats["spatial"].shape[1],)):
        raise ValueError(
            f"{source}: mu {mu.shape} / mu_s {mu_s.shape} do not match the {extractor} features "
            f"({feats['pool'].shape[1]} / {feats['spatial'].shape[1]}): ADM batches need inception-v3-compat"
        )
    return mu, sigma, mu_s, sigma_s


def check_source(source: str, image_size: int | None = None) -> None:
    """Raise, naming the fix, unless ``source`` is ``digits``, an existing ``.npz`` or an image folder with an
    ``image_size`` (checked before a feature extractor is built or anything is written)."""
    if source == "digits":
        return
    if not Path(source).exists():
        raise FileNotFoundError(
            f"--source {source} does not exist: give an ADM reference batch (.npz), a folder of class folders of "
            "images (with --image_size), or 'digits'"
        )
    if not source.endswith(".npz") and image_size is None:
        raise ValueError("a reference from an image folder needs --image_size (the ADM center crop, e.g. 256)")


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
