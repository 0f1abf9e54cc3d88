"""Small committed classifiers whose features score the CPU proxies' samples: the FID of the quickstart's digits
(``dico-digits``, 8x8) and the patch FID of the ablation budget ``crops16`` (``dico-crops16``, 16x16 crops of
scikit-image's bundled images, class = source image).

Each is committed (:data:`COMMITTED`: file and sha256), the same bytes on every machine: retraining, even
single-threaded with a fixed seed, gives weights that differ in the last bits between CPU kernels (BLAS picks them
by CPU), and training amplifies that. Both are torch-fidelity feature extractors (registered by name): 64-d
penultimate features (FID, KID, precision/recall) and logits (Inception Score).
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # torch-fidelity is a dependency; keep this module importable for the classifiers alone
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import register_feature_extractor
except ImportError:  # pragma: no cover
    FeatureExtractorBase, register_feature_extractor = nn.Module, None  # type: ignore[misc,assignment]


class SmallClassifier(nn.Module):
    """(B, 1, S, S) images in [-1, 1] -> logits (B, num_classes); :meth:`features` gives the 64-d penultimate
    layer. Two 3x3 convolutions, a 2x2 max-pool, two linear layers."""

    feature_dim = 64

    def __init__(self, image_size: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (image_size // 2) ** 2, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class CommittedClassifier:
    """A committed classifier file: its torch-fidelity name, input size, file and sha256, and how it was made."""

    name: str
    image_size: int
    file: Path
    sha256: str
    made_by: str

    def build(self) -> SmallClassifier:
        return SmallClassifier(self.image_size)


_HERE = Path(__file__).parent
COMMITTED = {
    c.name: c
    for c in (
        CommittedClassifier(
            "dico-digits",
            8,
            _HERE / "digits_classifier.pt",
            "628d13bd9342ea4a9ae2e7dab3c85d995f1600d191da47e0ac3c921232c3fae4",
            "dico.evaluation.digits.train_digits_classifier() (seed 0, 15 epochs, one thread, "
            "ATEN_CPU_CAPABILITY=default)",
        ),
        CommittedClassifier(
            "dico-crops16",
            16,
            _HERE / "crops16_classifier.pt",
            "850cc496c2e69f3ffd5045790c15d708874b305cae8a2a4231d292af1cf246cf",
            "dico.evaluation.crops.train_crops16_classifier() (seed 0, 5 epochs, one thread, "
            "ATEN_CPU_CAPABILITY=default; held-out accuracy 85.5%)",
        ),
    )
}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fit_classifier(
    x: Tensor,
    y: Tensor,
    image_size: int,
    epochs: int,
    seed: int,
    generator: torch.Generator,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> SmallClassifier:
    """A :class:`SmallClassifier` fitted by Adam on (x, y): initialised from ``seed``, batches drawn from
    ``generator``; single-threaded, so that the weights do not depend on the thread count (the caller's thread count
    and RNG state are restored). Returned in eval mode without gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(), torch.inference_mode(False), torch.enable_grad():  # callers may be in no_grad
            torch.manual_seed(seed)
            model = SmallClassifier(image_size, int(y.max()) + 1)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=generator).split(batch_size):
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def class_accuracy(classifier: SmallClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` ((B, 1, S, S) in [-1, 1]) that the classifier assigns to their ``labels``."""
    return (classifier(images.float()).argmax(1) == labels.to(images.device)).float().mean().item()


def load_committed(name: str, path: str | Path | None = None) -> SmallClassifier:
    """The committed classifier ``name``: the weights at ``path`` (``weights_only=True``) when the file exists, else
    the committed ones (copied to ``path`` when given). A file at ``path`` that is not the committed classifier is
    used, with a warning: its FIDs are not comparable with those of the committed one."""
    spec = COMMITTED[name]
    if file_sha256(spec.file) != spec.sha256:
        raise RuntimeError(f"{spec.file} is not the committed {name} classifier (sha256 {spec.sha256})")
    source = spec.file
    if path is not None and Path(path).exists():
        source = Path(path)
        if file_sha256(source) != spec.sha256:
            warnings.warn(
                f"{source} is not the committed {name} classifier (sha256 {spec.sha256[:12]}...): its FIDs are not "
                f"comparable with those of the committed one; delete it to use (a copy of) {spec.file.name}",
                stacklevel=2,
            )
    elif path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.file, path)
    model = spec.build()
    model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


class SmallClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor for every :data:`COMMITTED` classifier (by ``name``): uint8 (B, 1, S, S)
    images -> 64-d features and logits."""

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: object
    ) -> None:
        super().__init__(name, features_list)
        self.classifier = load_committed(name, feature_extractor_weights_path)

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
        size = self.classifier.image_size
        if x.dtype != torch.uint8 or x.shape[1:] != (1, size, size):
            raise ValueError(f"{self.name} takes uint8 (B, 1, {size}, {size}) images, got {x.dtype} {tuple(x.shape)}")
        feats = self.classifier.features(x.float() / 127.5 - 1)
        out = {"64": feats, "logits": self.classifier.head(feats)}
        return tuple(out[name] for name in self.features_list)


if register_feature_extractor is not None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    for _name in COMMITTED:
        if _name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(_name, SmallClassifierFeatureExtractor)
