"""What training on an accelerator needs from the stack: no host-device synchronisation in the training step beyond
what logging needs (on the CPU: no host read from dico's code between logging steps; on CUDA: none at all, under
``torch.cuda.set_sync_debug_mode("error")``)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.overrides import TorchFunctionMode

from dico.callbacks import EMA, Throughput
from dico.data import DigitsDataModule
from dico.module import DiffusionModule
from tests.conftest import ROOT, TINY_MODEL

# Tensor calls that copy a value to the host: on an accelerator each waits for every kernel queued before it.
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
DICO = str(ROOT / "dico")
# The model's label check reads the labels on CPUs only (on accelerators it asserts asynchronously).
CPU_ONLY = (str(ROOT / "dico" / "models" / "base.py"), "check_inputs")


class HostReadsFromDico(TorchFunctionMode):
    """Records ``(step, 'file:line')`` of each host read made from dico's code (the innermost dico frame of the
    stack; torch's and Lightning's own reads with no dico frame below them are not dico's to remove)."""

    def __init__(self, step: list[int], reads: list[tuple[int, str]]) -> None:
        super().__init__()
        self.step, self.reads = step, reads

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(DICO)]
            if frames and (frames[-1].filename, frames[-1].name) != CPU_ONLY:
                self.reads.append((self.step[0], f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"))
        return func(*args, **(kwargs or {}))


class WatchSteps(Callback):
    """Turns the recorder on for training steps 1.. (step 0 sets up lazily: tables copied to the device once)."""

    def __init__(self) -> None:
        self.step, self.reads = [0], []
        self.mode: HostReadsFromDico | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.step[0] = trainer.global_step
        if self.mode is None and trainer.global_step >= 1:
            self.mode = HostReadsFromDico(self.step, self.reads)
            self.mode.__enter__()

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if self.mode is not None:  # before the final checkpoint (a save reads the weights' check on purpose)
            self.mode.__exit__(None, None, None)
            self.mode = None


def test_training_steps_between_logging_steps_read_nothing_back_from_the_device(tmp_path):
    """The loss and weight check, the EMA update, the gradient norm and the progress-bar loss read values to the host
    only on the steps Lightning logs (every ``log_every_n_steps``); the steps between make no host read from dico's
    code, with the config's per-step callbacks (EMA, throughput, learning-rate monitor) and the progress bar on."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    watch = WatchSteps()
    trainer = Trainer(
        accelerator="cpu", max_steps=9, log_every_n_steps=4, default_root_dir=tmp_path, enable_model_summary=False,
        logger=CSVLogger(tmp_path), num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False,
        callbacks=[watch, EMA(decay=0.9), Throughput(), LearningRateMonitor(logging_interval="step")],
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3), DigitsDataModule(batch_size=64))
    logging_steps = {3, 7}  # (step + 1) % 4 == 0
    assert {step for step, _ in watch.reads} == logging_steps, watch.reads  # reads happen, only on those steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode watches CUDA streams")
def test_cuda_training_steps_do_not_synchronise_between_logging_steps(tmp_path):
    """training_step (loss, divergence check), backward, the fused AdamW step and the EMA update of steps that are
    not logged run under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call raises."""

    class SyncDebug(Callback):  # listed after EMA: its on_train_batch_end (the EMA update) runs inside the window
        def __init__(self) -> None:
            self.checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            step = trainer.global_step
            if step >= 1 and (step + 1) % trainer.log_every_n_steps:
                torch.cuda.set_sync_debug_mode("error")
                self.checked += 1

        def on_train_batch_end(self, trainer, pl_module, *args):  # type: ignore[no-untyped-def]
            torch.cuda.set_sync_debug_mode("default")

    sync = SyncDebug()
    for precision in ("32-true", "bf16-mixed"):
        trainer = Trainer(
            accelerator="cuda", devices=1, max_steps=8, log_every_n_steps=4, default_root_dir=tmp_path,
            logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, precision=precision, callbacks=[EMA(decay=0.9), sync],
        )  # fmt: skip
        try:
            trainer.fit(DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL), DigitsDataModule(batch_size=64))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sync.checked == 2 * 5  # steps 1, 2, 4, 5, 6 of each run
