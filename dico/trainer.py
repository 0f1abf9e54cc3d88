"""The Trainer the CLI builds: Lightning's, with batch limits that read a whole number as a count of batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer as LightningTrainer


class Trainer(LightningTrainer):
    """``lightning.pytorch.Trainer`` with ``limit_{train,val,test,predict}_batches`` typed ``int | float``.

    Lightning types them ``float | int``; a config parser (jsonargparse, LightningCLI) tries the float first, so
    ``--trainer.limit_val_batches 1`` became ``1.0``, i.e. *every* batch instead of one (2 and more were cast back
    to a count by Lightning, 1 cannot be). Typed int-first, ``1`` is one batch and ``1.0`` or ``0.5`` fractions,
    as Lightning documents. Everything else is Lightning's Trainer unchanged.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )
