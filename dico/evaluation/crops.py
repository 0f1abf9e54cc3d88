"""The classifier behind the ``crops16`` ablation budget's patch FID (``dico-crops16``): which of scikit-image's
bundled images (:data:`dico.data.image_crops.IMAGES`) a 16x16 grayscale crop comes from.

Trained on the budget's training crops (the data every crops16 row trains on; ``crop_seed`` 0) and checked on its
held-out crops (a region of each image no training crop touches). Committed as ``crops16_classifier.pt`` (sha256 in
:data:`dico.evaluation.small_classifier.COMMITTED`)."""

from __future__ import annotations

import torch

from dico.data.image_crops import image_crops

from .small_classifier import SmallClassifier, class_accuracy, fit_classifier

NAME = "dico-crops16"


def train_crops16_classifier(seed: int = 0, epochs: int = 5) -> tuple[SmallClassifier, float]:
    """Fit on the crops16 training crops (seeded, single-threaded; about a minute on a CPU core); returns the model
    and its accuracy on the held-out crops."""
    crops = image_crops(crop_size=16)
    x, y = torch.from_numpy(crops.train_x), torch.from_numpy(crops.train_y)
    model = fit_classifier(x, y, 16, epochs, seed, torch.Generator().manual_seed(seed), batch_size=128)
    return model, class_accuracy(model, torch.from_numpy(crops.heldout_x), torch.from_numpy(crops.heldout_y))
