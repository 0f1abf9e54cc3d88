"""A small classifier of scikit-learn's 8x8 digits: judges whether quickstart samples are digits of the class
asked for, and supplies the features of the quickstart's (and the ablation proxy's) FID.

The FID's classifier is the committed one (``digits_classifier.pt``, sha256 :data:`COMMITTED_SHA256`), the same
bytes on every machine: training it again, even single-threaded with a fixed seed, gives weights that differ in the
4th digit between CPU kernels (``ATEN_CPU_CAPABILITY=default|avx2|avx512``), and with the thread count otherwise.
It was made by ``train_digits_classifier()`` (seed 0, 15 epochs, one thread, ``ATEN_CPU_CAPABILITY=default``)."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dico.data.datamodule import load_digits_arrays

try:  # torch-fidelity is a dependency; keep this module importable for the classifier alone
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import register_feature_extractor
except ImportError:  # pragma: no cover
    FeatureExtractorBase, register_feature_extractor = nn.Module, None  # type: ignore[misc,assignment]


class DigitsClassifier(nn.Module):
    """(B, 1, 8, 8) images in [-1, 1] -> logits (B, 10); :meth:`features` gives the 64-d penultimate layer."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 16, self.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


COMMITTED = Path(__file__).with_name("digits_classifier.pt")
COMMITTED_SHA256 = "628d13bd9342ea4a9ae2e7dab3c85d995f1600d191da47e0ac3c921232c3fae4"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_digits_classifier(seed: int = 0, epochs: int = 15, holdout: float = 0.2) -> tuple[DigitsClassifier, float]:
    """Fit on the real digits (seeded, single-threaded so that the weights do not depend on the thread count; a few
    seconds on a CPU); returns the model and its held-out accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs, holdout)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, epochs: int, holdout: float) -> tuple[DigitsClassifier, float]:
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_arrays()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * holdout)
    test, train = order[:n_test], order[n_test:]
    with torch.random.fork_rng(), torch.inference_mode(False), torch.enable_grad():  # callers may be in no_grad
        torch.manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train), generator=g)].split(64):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    return model, accuracy


@torch.no_grad()
def class_accuracy(classifier: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` ((B, 1, 8, 8) in [-1, 1]) that the classifier assigns to their ``labels``."""
    return (classifier(images.float()).argmax(1) == labels.to(images.device)).float().mean().item()


def load_or_train_classifier(path: str | Path | None) -> DigitsClassifier:
    """The FID's classifier: the weights at ``path`` (``weights_only=True``) when the file exists, else the committed
    ones (copied to ``path`` when given). A file at ``path`` that is not the committed classifier is used, with a
    warning: its FIDs are not comparable with those of the committed one."""
    if file_sha256(COMMITTED) != COMMITTED_SHA256:
        raise RuntimeError(f"{COMMITTED} is not the committed digits classifier (sha256 {COMMITTED_SHA256})")
    source = COMMITTED
    if path is not None and Path(path).exists():
        source = Path(path)
        if file_sha256(source) != COMMITTED_SHA256:
            warnings.warn(
                f"{source} is not the committed digits classifier (sha256 {COMMITTED_SHA256[:12]}...): its FIDs are "
                f"not comparable with those of the committed one; delete it to use (a copy of) {COMMITTED.name}",
                stacklevel=2,
            )
    elif path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(COMMITTED, path)
    model = DigitsClassifier()
    model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor ``dico-digits``: uint8 (B, 1, 8, 8) digits -> 64-d features (FID, KID,
    precision/recall) and 10 logits (Inception Score), from :class:`DigitsClassifier`."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: object) -> None:  # fmt: skip
        super().__init__(name, features_list)
        self.classifier = load_or_train_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("64", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"dico-digits takes uint8 (B, 1, 8, 8) images, got {x.dtype} {tuple(x.shape)}")
        feats = self.classifier.features(x.float() / 127.5 - 1)
        out = {"64": feats, "logits": self.classifier.head(feats)}
        return tuple(out[name] for name in self.features_list)


if register_feature_extractor is not None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if "dico-digits" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("dico-digits", DigitsFeatureExtractor)
