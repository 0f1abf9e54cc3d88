"""FID, Inception Score, precision/recall and KID through torch-fidelity, in memory, against cached reference
features.

torch-fidelity supplies the feature extractors and the metric formulas; this module feeds them uint8 image
tensors (no image files), caches the reference side once (``compute_reference``), and loads feature-extractor
weights safely from local files (``weights_only=True``: torch-fidelity itself would fully unpickle them).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
DIGITS = "dico-digits"


@dataclass
class FeatureSpec:
    """Which torch-fidelity feature extractor, and where its weights are.

    Args:
        name: ``inception-v3-compat`` (the paper's protocol) or ``dico-digits`` (the quickstart's classifier).
        weights_path: a local weights file. Required offline for Inception (torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth``); for ``dico-digits`` a missing file is trained
            (seeded, seconds) and saved there.
    """

    name: str = INCEPTION
    weights_path: str | None = None


def _safe_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_feature_extractor(spec: FeatureSpec, features: Iterable[str], device: torch.device | str = "cpu") -> Any:
    """A torch-fidelity feature extractor producing ``features`` (e.g. ``("2048", "logits_unbiased")``)."""
    features = list(features)
    if spec.name == DIGITS:
        from .digits import DigitsFeatureExtractor

        return DigitsFeatureExtractor(DIGITS, features, feature_extractor_weights_path=spec.weights_path).to(device)
    if spec.name != INCEPTION:
        raise ValueError(f"unknown feature extractor {spec.name!r}; use {INCEPTION!r} or {DIGITS!r}")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if spec.weights_path is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if offline:
            raise FileNotFoundError(
                f"no Inception weights: set the evaluation option weights_path to a local copy of {INCEPTION_FILE} "
                "(torch-fidelity's inception-v3-compat weights); this machine is offline (HF_HUB_OFFLINE)"
            )
        try:
            return FeatureExtractorInceptionV3(INCEPTION, features).to(device)
        except Exception as e:  # the download failed
            raise FileNotFoundError(
                f"could not download the Inception weights ({e}); set weights_path to a local copy of {INCEPTION_FILE}"
            ) from e
    if not Path(spec.weights_path).exists():
        raise FileNotFoundError(
            f"Inception weights {spec.weights_path} do not exist; set weights_path to a local copy of {INCEPTION_FILE}"
        )
    state = _safe_state_dict(spec.weights_path)
    # Hand torch-fidelity a file we wrote from plain tensors, so its own full unpickling is harmless.
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "inception.pt"
        torch.save(state, clean)
        return FeatureExtractorInceptionV3(INCEPTION, features, feature_extractor_weights_path=str(clean)).to(device)


def feature_names(extractor: Any) -> dict[str, str]:
    """The feature layer each metric uses, as torch-fidelity defines it for this extractor."""
    return {m: extractor.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "kid", "prc")}


@torch.no_grad()
def extract_features(extractor: Any, images: Tensor | np.ndarray, batch_size: int = 100) -> dict[str, Tensor]:
    """uint8 images (N, C, H, W) tensor or (N, H, W, C) array -> {feature name: (N, D) float32 on CPU}
    (float32, as torch-fidelity keeps them, so that our metrics equal its own)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if images.dtype != torch.uint8:
        raise ValueError(f"feature extraction takes uint8 images, got {images.dtype}")
    device = next(extractor.parameters()).device
    out: dict[str, list[Tensor]] = {name: [] for name in extractor.get_requested_features_list()}
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        if chunk.shape[1] == 1 and extractor.get_name() == INCEPTION:
            chunk = chunk.expand(-1, 3, -1, -1)
        feats = extractor.convert_features_tuple_to_dict(extractor(chunk))
        for name, value in feats.items():
            out[name].append(value.float().cpu())
    return {name: torch.cat(values) if values else torch.zeros(0) for name, values in out.items()}


@dataclass
class Reference:
    """Cached reference side of the metrics: FID statistics and features for precision/recall and KID."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray  # (N, D) of the FID/PRC/KID layer (possibly a subset, see ``max_features``)
    meta: dict[str, Any]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.mu, self.sigma, self.features):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features, meta=np.array(json.dumps(self.meta)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"reference statistics {path} do not exist; compute them once with "
                "`python cli.py reference --source IMAGES_OR_NPZ --out " + str(path) + "`"
            )
        try:
            with np.load(path, allow_pickle=False) as d:
                return cls(d["mu"], d["sigma"], d["features"], json.loads(str(d["meta"])))
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a dico reference-statistics file ({e}); recompute it") from e


def reference_from_features(features: Tensor, spec: FeatureSpec, source: str, max_features: int = 50_000) -> Reference:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features)
    keep = features[:max_features].numpy()
    meta = {"feature_extractor": spec.name, "count": len(features), "source": source}
    return Reference(stats["mu"], stats["sigma"], keep, meta)


def compute_metrics(
    generated: dict[str, Tensor],
    reference: Reference,
    layers: dict[str, str],
    isc_splits: int = 10,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
) -> dict[str, float]:
    """FID, IS, precision/recall and KID of generated features against the reference (torch-fidelity's formulas)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    feats = generated[layers["fid"]]
    ref_feats = torch.from_numpy(reference.features)
    stats = fid_features_to_statistics(feats)
    out = dict(fid_statistics_to_metric(stats, {"mu": reference.mu, "sigma": reference.sigma}, verbose=False))
    if layers["isc"] in generated:
        out.update(isc_features_to_metric(generated[layers["isc"]], splits=min(isc_splits, len(feats))))
    n = min(len(feats), len(ref_feats))
    out.update(kid_features_to_metric(feats, ref_feats, kid_subset_size=min(kid_subset_size, n), verbose=False))
    out.update(prc_features_to_metric(feats, ref_feats, prc_neighborhood=min(prc_neighborhood, n - 1), verbose=False))
    return {k: float(v) for k, v in out.items()}
