"""Small models trained on the 8x8 digits for the analyses (the training stack, CPU-sized), and noised
digits to feed them."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dico.module import DiffusionModule

#: Digits-sized overrides: one 8x8 pixel channel, ten classes.
DIGITS = {"in_channels": 1, "input_size": 8, "num_classes": 10}


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up banners (GPU/TPU availability, tips) and its warnings about tiny runs, hidden."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def train_on_digits(
    model: str,
    model_kwargs: dict[str, Any] | None = None,
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
) -> DiffusionModule:
    """Train a registered backbone on scikit-learn's digits for ``steps`` steps with the training stack
    (:class:`DiffusionModule`, EMA with warm-up); returns the module with the EMA weights in place, in eval mode.

    No logger, checkpoint or progress bar: this is for analyses inside a notebook or a test.
    """
    from lightning.pytorch import Trainer, seed_everything

    from dico.callbacks import EMA
    from dico.data import DigitsDataModule
    from dico.module import DiffusionModule

    seed_everything(seed, verbose=False)
    module = DiffusionModule(
        model,
        model_kwargs={**DIGITS, **(model_kwargs or {})},
        lr=lr,
        seed=seed,
        clip_denoised=True,
        sampling_steps=50,
        sampler="ddim",
    )
    with quiet_lightning():
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[EMA(decay=ema_decay, warmup=True)],
        )
        trainer.fit(module, DigitsDataModule(batch_size=batch_size, seed=seed))
    return module.eval()


def noised_digits(
    timesteps: list[int] | tuple[int, ...], per_class: int = 4, seed: int = 0, diffusion_steps: int = 1000
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Real digits noised by the training process: for each timestep, ``(x_t, t, y)`` with ``per_class``
    digits of every class (the same digits and noise at every timestep)."""
    import numpy as np

    from dico.data.datamodule import load_digits_arrays
    from dico.diffusion import create_diffusion

    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
    x0, y = torch.from_numpy(images[picks]), torch.from_numpy(labels[picks])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    diffusion = create_diffusion("", diffusion_steps=diffusion_steps)
    out = []
    for step in timesteps:
        t = torch.full((len(y),), int(step), dtype=torch.long)
        out.append((diffusion.q_sample(x0, t, noise), t, y))
    return out


__all__ = ["DIGITS", "noised_digits", "quiet_lightning", "train_on_digits"]
