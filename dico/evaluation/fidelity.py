"""Features and metrics: FID, sFID, Inception Score, precision/recall and KID, in memory, against a cached
reference.

torch-fidelity supplies the feature extractors (its Inception is a bit-exact port of the TF graph ADM uses) and
the FID/KID formulas; the spatial features of sFID come from a forward hook on the same network (ADM:
``mixed_6/conv``, first 7 channels, flattened in TF's NHWC order = torch-fidelity's ``Mixed_6d``). Where ADM's
evaluator (``guided-diffusion/evaluations/evaluator.py``, the paper's numbers) differs from torch-fidelity --
Inception Score splits and precision/recall distances -- :class:`MetricOptions` picks one and the record says
which. Feature-extractor weights load from local files with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dico.runtime import hub_offline

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# sha256 of torch-fidelity's release file INCEPTION_FILE (its name carries the first 8 hex digits, as torch.hub names
# checked files; the same bytes as pytorch-fid's pt_inception-2015-12-05-6726825d.pth): the weights of the paper's
# FID. Only features of this file are compared with published figures.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
DIGITS = "dico-digits"
CROPS16 = "dico-crops16"
SMALL_CLASSIFIERS = (DIGITS, CROPS16)  # dico.evaluation.small_classifier.COMMITTED
FEATURE_EXTRACTORS = (INCEPTION, *SMALL_CLASSIFIERS)
SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7]
CONVENTIONS = ("adm", "torch-fidelity")


@dataclass
class FeatureSpec:
    """Which torch-fidelity feature extractor, and where its weights are.

    Args:
        name: ``inception-v3-compat`` (the paper's protocol), ``dico-digits`` (the quickstart's classifier) or
            ``dico-crops16`` (the crops16 ablation budget's patch FID).
        weights_path: a local weights file. Required offline for Inception (torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth``); for the small classifiers a missing file gets a copy of
            the committed one (``dico/evaluation/<name>_classifier.pt``), None uses it in place.
    """

    name: str = INCEPTION
    weights_path: str | None = None


@dataclass(frozen=True)
class MetricOptions:
    """How the metrics are computed where ADM's evaluator and torch-fidelity differ.

    Args:
        convention: ``adm`` (the paper's numbers): Inception Score over contiguous splits of ``isc_split_size``
            samples in sample order, no shuffling; precision/recall with ADM's manifold estimator (squared
            distances computed in float16 when finite, k-th neighbour radii, blocks of 10,000). ``torch-fidelity``:
            ``isc_splits`` equal splits after a seeded shuffle; precision/recall from float32 ``cdist``.
        prc_neighborhood: k of the k-NN manifold radii (3 in both).
        kid_subset_size: KID subsets (torch-fidelity's formula; ADM does not report KID).
    """

    convention: str = "adm"
    isc_split_size: int = 5000
    isc_splits: int = 10
    prc_neighborhood: int = 3
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"metric convention must be one of {CONVENTIONS}, got {self.convention!r}")


def _safe_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _cached_inception_weights() -> Path:
    """torch-fidelity's Inception weights in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded there
    once when online. (torch-fidelity's own download would unpickle the file fully; it is loaded weights-only.)"""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    dest = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if dest.is_file():
        return dest
    if hub_offline():
        raise FileNotFoundError(
            f"no Inception weights: set the evaluation option weights_path to a local copy of {INCEPTION_FILE} "
            f"(torch-fidelity's inception-v3-compat weights), or put it at {dest}; this machine is offline "
            "(HF_HUB_OFFLINE)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(dest))
    except OSError as e:
        raise FileNotFoundError(
            f"could not download the Inception weights ({e}); set weights_path to a local copy of {INCEPTION_FILE}"
        ) from e
    return dest


def weights_file(spec: FeatureSpec) -> Path:
    """The file ``spec``'s extractor loads its weights from: ``weights_path``, else torch-fidelity's Inception file
    in torch's hub cache, or the committed small classifier (when ``weights_path`` does not exist yet)."""
    if spec.name in SMALL_CLASSIFIERS:
        from .small_classifier import COMMITTED

        given = Path(spec.weights_path) if spec.weights_path else None
        return given if given is not None and given.is_file() else COMMITTED[spec.name].file
    path = Path(spec.weights_path) if spec.weights_path else _cached_inception_weights()
    if not path.exists():
        raise FileNotFoundError(
            f"Inception weights {path} do not exist; set weights_path to a local copy of {INCEPTION_FILE}"
        )
    return path


def build_feature_extractor(spec: FeatureSpec, features: Iterable[str], device: torch.device | str = "cpu") -> Any:
    """A torch-fidelity feature extractor producing ``features`` (e.g. ``("2048", "logits_unbiased")``)."""
    features = list(features)
    if spec.name in SMALL_CLASSIFIERS:
        from .small_classifier import SmallClassifierFeatureExtractor

        weights = spec.weights_path
        return SmallClassifierFeatureExtractor(spec.name, features, feature_extractor_weights_path=weights).to(device)
    if spec.name != INCEPTION:
        raise ValueError(f"unknown feature extractor {spec.name!r}; use one of {FEATURE_EXTRACTORS}")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights_path = weights_file(spec)
    state = _safe_state_dict(weights_path)
    # Hand torch-fidelity a file we wrote from plain tensors, so its own full unpickling is harmless.
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "inception.pt"
        torch.save(state, clean)
        return FeatureExtractorInceptionV3(INCEPTION, features, feature_extractor_weights_path=str(clean)).to(device)


def feature_names(extractor: Any) -> dict[str, str]:
    """The feature layer each metric uses, as torch-fidelity defines it for this extractor."""
    return {m: extractor.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "kid", "prc")}


def weights_sha256(module: torch.nn.Module) -> str:
    """A hash of a network's parameters and buffers (names, shapes, values): which weights made the features."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Featurizer:
    """uint8 images -> the features of every metric: ``pool`` (N, D) for FID, precision/recall and KID,
    ``spatial`` (N, S) for sFID and ``logits`` (N, K) for the Inception Score, as float32 on the CPU.

    For Inception, ``spatial`` is ADM's: the first 7 channels of ``Mixed_6d`` (TF ``mixed_6``, 17x17 at 299
    pixels) flattened in NHWC order (N, 2023); for the small classifiers the first 7 channels of their pooled
    conv features (N, 7 x (S/2)^2: 112 for ``dico-digits``, 448 for ``dico-crops16``).
    """

    def __init__(self, spec: FeatureSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        requested = ["2048", "logits_unbiased"] if spec.name == INCEPTION else ["64", "logits"]
        self.extractor = build_feature_extractor(spec, requested, device)
        self.layers = feature_names(self.extractor)
        self.weights_sha256 = weights_sha256(self.extractor)
        from .small_classifier import file_sha256

        self.weights_file_sha256 = file_sha256(weights_file(spec))  # the file, as published weights are known by
        hooked = self.extractor.Mixed_6d if spec.name == INCEPTION else self.extractor.classifier.body[4]
        self._spatial: list[Tensor] = []
        hooked.register_forward_hook(lambda mod, args, out: self._spatial.append(out[:, :SPATIAL_CHANNELS]))

    @property
    def identity(self) -> dict[str, str]:
        """What the features depend on: extractor name and weights hash."""
        return {"feature_extractor": self.spec.name, "weights_sha256": self.weights_sha256}

    @property
    def device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray) -> dict[str, Tensor]:
        """One batch: uint8 (B, C, H, W) tensor or (B, H, W, C) array."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        if images.dtype != torch.uint8:
            raise ValueError(f"feature extraction takes uint8 images, got {images.dtype}")
        # Fresh default strides: the memory layout picks the kernels, and the features should not depend on it.
        x = images.to(self.device).clone(memory_format=torch.contiguous_format)
        if x.shape[1] == 1 and self.spec.name == INCEPTION:
            x = x.expand(-1, 3, -1, -1)
        self._spatial.clear()
        feats = self.extractor.convert_features_tuple_to_dict(self.extractor(x))
        spatial = self._spatial.pop()
        return {
            "pool": feats[self.layers["fid"]].float().cpu(),
            "logits": feats[self.layers["isc"]].float().cpu(),
            "spatial": spatial.permute(0, 2, 3, 1).flatten(1).float().cpu(),
        }

    def run(self, batches: Iterable[Tensor | np.ndarray]) -> dict[str, Tensor]:
        """All batches' features, concatenated."""
        out: dict[str, list[Tensor]] = {}
        for batch in batches:
            for k, v in self(batch).items():
                out.setdefault(k, []).append(v)
        if not out:
            raise ValueError("no images to featurise")
        return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- metrics
def gaussian_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 features -> mean (D,) and covariance (D, D) as ADM's evaluator (and torch-fidelity) compute
    them: ``np.mean`` in float32, ``np.cov(rowvar=False)`` in float64; both returned as float64."""
    x = np.asarray(features.numpy() if isinstance(features, Tensor) else features, dtype=np.float32)
    return x.mean(axis=0).astype(np.float64), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians (torch-fidelity's formula, in float64 whatever the inputs)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def f64(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float64)

    out = fid_statistics_to_metric(
        {"mu": f64(mu1), "sigma": f64(sigma1)}, {"mu": f64(mu2), "sigma": f64(sigma2)}, verbose=False
    )
    return float(out[KEY_METRIC_FID])


def inception_score_adm(logits: Tensor, split_size: int = 5000) -> dict[str, float]:
    """ADM's Inception Score: softmax, then exp(mean KL(p || mean p)) over contiguous splits of ``split_size``
    samples in sample order (the last split holds the rest), averaged; float64."""
    p = logits.double().softmax(dim=1)
    log_p = logits.double().log_softmax(dim=1)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start : start + split_size], log_p[start : start + split_size]
        kl = (part * (log_part - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(kl.exp().item())
    return {"inception_score_mean": float(np.mean(scores)), "inception_score_std": float(np.std(scores))}


def _squared_distances(u: Tensor, v: Tensor) -> Tensor:
    """ADM's pairwise distances max(|u|^2 - 2 u.v + |v|^2, 0) in float16 (float32 if that overflows): inputs
    rounded to float16, products accumulated in float32 and rounded to float16 (as a GPU's half matmul does;
    this also keeps CPUs, which have no fast half matmul, at float32 speed)."""
    a, b = u.half().float(), v.half().float()
    d = (a.square().sum(1).half()[:, None] - 2 * (a @ b.T).half() + b.square().sum(1).half()[None]).clamp_min(0)
    if torch.isfinite(d).all():
        return d.float()
    u, v = u.float(), v.float()
    return (u.square().sum(1)[:, None] - 2 * u @ v.T + v.square().sum(1)[None]).clamp_min(0)


def _manifold_radii(features: Tensor, k: int, block: int) -> Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the set (itself at rank 0)."""
    radii = []
    for rows in features.split(block):
        d = torch.cat([_squared_distances(rows, cols) for cols in features.split(block)], dim=1)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(queries: Tensor, support: Tensor, radii: Tensor, block: int) -> float:
    """Fraction of ``queries`` within the radius of some ``support`` point."""
    inside = []
    for rows in queries.split(block):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, r in zip(support.split(block), radii.split(block), strict=True):
            hit |= (_squared_distances(rows, cols) <= r[None]).any(1)
        inside.append(hit)
    return torch.cat(inside).double().mean().item()


def precision_recall_adm(real: Tensor, fake: Tensor, k: int = 3, block: int = 10_000) -> dict[str, float]:
    """ADM's improved precision/recall (its ``ManifoldEstimator``): precision = fraction of samples inside the
    real manifold (k-NN hyperspheres), recall = fraction of real features inside the samples' manifold."""
    real_radii, fake_radii = _manifold_radii(real, k, block), _manifold_radii(fake, k, block)
    return {
        "precision": _fraction_inside(fake, real, real_radii, block),
        "recall": _fraction_inside(real, fake, fake_radii, block),
    }


MIN_SAMPLES = 2  # a covariance (FID), a nearest neighbour other than itself (precision/recall), a KID pair


def metric_settings_used(options: MetricOptions, num_samples: int, num_reference: int) -> dict[str, int]:
    """What :func:`compute_metrics` uses on ``num_samples`` samples and ``num_reference`` reference features: k of
    precision/recall and the KID subset size shrink to what the smaller set allows, the Inception Score splits
    follow from the sample count. Raises (naming the minimum) below :data:`MIN_SAMPLES`."""
    n = min(num_samples, num_reference)
    if n < MIN_SAMPLES:
        which = f"{num_samples} samples" if num_samples < MIN_SAMPLES else f"{num_reference} reference features"
        raise ValueError(
            f"the metrics need at least {MIN_SAMPLES} samples and {MIN_SAMPLES} reference features (a covariance, a "
            f"nearest neighbour), got {which}: score more samples (the paper's protocol: 50000)"
        )
    if options.convention == "adm":
        splits = -(-num_samples // options.isc_split_size)
    else:
        splits = min(options.isc_splits, num_samples)
    return {
        "num_samples": num_samples,
        "num_reference_features": num_reference,
        "prc_neighborhood": min(options.prc_neighborhood, n - 1),
        "kid_subset_size": min(options.kid_subset_size, n),
        "inception_score_splits": splits,
    }


def compute_metrics(
    generated: dict[str, Tensor], reference: Any, options: MetricOptions = MetricOptions()
) -> dict[str, float]:
    """FID, sFID, IS, precision/recall and KID of generated features (:class:`Featurizer` output) against a
    :class:`~dico.evaluation.reference.Reference`, with the k and subset sizes of :func:`metric_settings_used`."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    pool = generated["pool"]
    ref_pool = torch.from_numpy(np.asarray(reference.features, dtype=np.float32))
    used = metric_settings_used(options, len(pool), len(ref_pool))
    out = {"frechet_inception_distance": frechet_distance(*gaussian_statistics(pool), reference.mu, reference.sigma)}
    if len(reference.mu_s):  # (an ADM batch without mu_s/sigma_s gives no sFID; its record says so)
        out["spatial_frechet_inception_distance"] = frechet_distance(
            *gaussian_statistics(generated["spatial"]), reference.mu_s, reference.sigma_s
        )
    k = used["prc_neighborhood"]
    if options.convention == "adm":
        out.update(inception_score_adm(generated["logits"], options.isc_split_size))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out.update(precision_recall_adm(ref_pool.to(device), pool.to(device), k))
    else:
        out.update(isc_features_to_metric(generated["logits"], splits=used["inception_score_splits"]))
        out.update(prc_features_to_metric(pool, ref_pool, prc_neighborhood=k, verbose=False))
    out.update(kid_features_to_metric(pool, ref_pool, kid_subset_size=used["kid_subset_size"], verbose=False))
    return {key: float(v) for key, v in out.items()}
