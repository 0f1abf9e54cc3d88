"""The classifier of scikit-learn's 8x8 digits: judges whether quickstart samples are digits of the class asked
for, and supplies the features of the quickstart's (and the digits ablation proxy's) FID (``dico-digits``).

The FID's classifier is the committed one (``digits_classifier.pt``, sha256 :data:`COMMITTED_SHA256`; see
:mod:`dico.evaluation.small_classifier` for why it is committed rather than retrained)."""

from __future__ import annotations

import torch

from dico.data.datamodule import load_digits_arrays

from .small_classifier import COMMITTED as _COMMITTED
from .small_classifier import SmallClassifier, class_accuracy, file_sha256, fit_classifier, load_committed

NAME = "dico-digits"
COMMITTED = _COMMITTED[NAME].file
COMMITTED_SHA256 = _COMMITTED[NAME].sha256


def DigitsClassifier() -> SmallClassifier:
    """(B, 1, 8, 8) digits in [-1, 1] -> logits (B, 10)."""
    return SmallClassifier(8, 10)


def train_digits_classifier(seed: int = 0, epochs: int = 15, holdout: float = 0.2) -> tuple[SmallClassifier, float]:
    """Fit on the real digits (seeded, single-threaded; a few seconds on a CPU); returns the model and its held-out
    accuracy. How the committed file was made (seed 0, 15 epochs, ``ATEN_CPU_CAPABILITY=default``)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_arrays()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * holdout)
    test, train = order[:n_test], order[n_test:]
    model = fit_classifier(x[train], y[train], 8, epochs, seed, g)
    return model, class_accuracy(model, x[test], y[test])


def load_or_train_classifier(path: str | None = None) -> SmallClassifier:
    """The FID's digits classifier (:func:`~dico.evaluation.small_classifier.load_committed`)."""
    return load_committed(NAME, path)


__all__ = [
    "COMMITTED",
    "COMMITTED_SHA256",
    "DigitsClassifier",
    "class_accuracy",
    "file_sha256",
    "load_or_train_classifier",
    "train_digits_classifier",
]
