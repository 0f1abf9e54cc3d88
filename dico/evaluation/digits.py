"""A small classifier of scikit-learn's 8x8 digits: judges whether quickstart samples are digits of the class
asked for, and supplies the features of the quickstart's FID."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dico.data.datamodule import load_digits_arrays


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


def train_digits_classifier(seed: int = 0, epochs: int = 30, holdout: float = 0.2) -> tuple[DigitsClassifier, float]:
    """Fit on the real digits (seeded, about two seconds on a CPU); returns the model and its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_arrays()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * holdout)
    test, train = order[:n_test], order[n_test:]
    with torch.random.fork_rng():
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
