"""What training on an accelerator needs from the stack: no host-device synchronisation in the training step beyond
what logging needs (on the CPU: no host read from dico's code between logging steps; on CUDA: none at all, under
``torch.cuda.set_sync_debug_mode("error")``)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.overrides import TorchFunctionMode

from dico.callbacks import EMA
from dico.checkpoints import read_checkpoint
from dico.data import DigitsDataModule
from dico.module import DiffusionModule
from tests.conftest import ROOT, TINY_MODEL, cpu_trainer

# Tensor calls that copy a value to the host: on an accelerator each waits for every kernel queued before it.
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
DICO = str(ROOT / "dico")
# The model's label check reads the labels on CPUs only (on accelerators it asserts asynchronously).
CPU_ONLY = (str(ROOT / "dico" / "models" / "base.py"), "check_inputs")
FIT_ENTRY = (str(ROOT / "dico" / "trainer.py"), "fit")  # dico's Trainer.fit runs all of Lightning's fit below it


class HostReadsFromDico(TorchFunctionMode):
    """Records ``(step, 'file:line')`` of each host read made from dico's code (the innermost dico frame of the
    stack; torch's and Lightning's own reads with no dico frame below them are not dico's to remove)."""

    def __init__(self, step: list[int], reads: list[tuple[int, str]]) -> None:
        super().__init__()
        self.step, self.reads = step, reads

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in HOST_READS:
            stack = traceback.extract_stack()[:-1]
            frames = [f for f in stack if f.filename.startswith(DICO) and (f.filename, f.name) != FIT_ENTRY]
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


def fit_default_callbacks(root: Path, accelerator: str, precision: str, first: Callback, last: Callback) -> None:
    """``python cli.py fit -c experiments/quickstart.yaml`` in ``root/precision`` at a tiny model for 9 steps, logging
    every 4th, with the whole default callback list (``dico/callbacks/callbacks.yaml``) and a CSV logger; ``first``
    runs each hook before all of them, ``last`` after all of them (the checkpoint callbacks, which Lightning runs
    last, included). The periodic evaluations, grids and saves fall outside steps 1-8 (every 300 steps; the FID
    neither at the start nor at the end, no final grid)."""
    import yaml

    from cli import build_lightning_cli
    from dico.callbacks.named import CALLBACKS, OFF
    from tests.conftest import QUICKSTART

    run = root / precision  # the digits FID's reference and classifier: made once in root
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}}]
    argv = [
        "-c",
        str(QUICKSTART),
        "--model.model_kwargs",
        yaml.safe_dump(TINY_MODEL, default_flow_style=True),
        "--fid.reference",
        str(root / "digits-reference.npz"),
        "--fid.weights_path",
        str(root / "digits-classifier.pt"),
        "--trainer.default_root_dir",
        str(run),
        "--trainer.accelerator",
        accelerator,
        "--trainer.devices",
        "1",
        "--trainer.precision",
        precision,
        "--trainer.max_steps",
        "9",
        "--trainer.log_every_n_steps",
        "4",
        "--trainer.logger",
        json.dumps(logger),
        "--trainer.enable_progress_bar",
        "true",
        "--fid.at_start",
        "false",
        "--fid.every_n_steps",
        "0",
        "--grid.final_per_class",
        "0",
        "--data.init_args.batch_size",
        "64",
    ]
    cli = build_lightning_cli(argv, run=False)
    callbacks = cli.trainer.callbacks
    listed = {cls.__name__ for key, cls in CALLBACKS.items() if key not in OFF}
    assert listed <= {type(c).__name__ for c in callbacks}  # the whole list (the progress bar and config saver too)
    callbacks.insert(0, first)
    callbacks.append(last)
    torch.manual_seed(0)
    cli.trainer.fit(cli.model, cli.datamodule)


def test_training_steps_between_logging_steps_read_nothing_back_from_the_device(tmp_path):
    """The loss and weight check, the EMA update, the gradient norm and the progress-bar loss read values to the host
    only on the steps Lightning logs (every ``log_every_n_steps``); the steps between make no host read from dico's
    code, with the whole default callback list and the progress bar on."""
    watch = WatchSteps()
    fit_default_callbacks(tmp_path, "cpu", "32-true", watch, Callback())
    logging_steps = {3, 7}  # (step + 1) % 4 == 0
    assert {step for step, _ in watch.reads} == logging_steps, watch.reads  # reads happen, only on those steps


def test_the_ema_average_follows_the_model_to_its_training_device():
    """Lightning builds the average in ``setup``, before the strategy moves the model to the accelerator; the average
    must follow it there (on a GPU it stayed on the CPU: each step copied every weight to the host and averaged them
    on the CPU), unless ``device`` pins it. The move is staged here with the meta device."""
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    for ema, expected in ((EMA(decay=0.9), "meta"), (EMA(decay=0.9, device="cpu"), "cpu")):
        module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL)
        ema.setup(trainer, module, "fit")
        module.to("meta")  # what the strategy does after setup: model_to_device
        ema.on_fit_start(trainer, module)
        average = ema._average_model
        assert {t.device.type for t in [*average.parameters(), *average.buffers()]} == {expected}


class SyncDebugOn(Callback):
    """Before every other callback's ``on_train_batch_start`` of a step that is not logged (from step 1): any call that
    synchronises with the GPU raises (``torch.cuda.set_sync_debug_mode("error")``)."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        step = trainer.global_step
        if step >= 1 and (step + 1) % trainer.log_every_n_steps:
            torch.cuda.set_sync_debug_mode("error")
            self.checked += 1


class SyncDebugOff(Callback):
    """After every other callback's ``on_train_batch_end`` (the checkpoint callbacks' too): the check ends."""

    def on_train_batch_end(self, trainer, pl_module, *args):  # type: ignore[no-untyped-def]
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode watches CUDA streams")
def test_cuda_training_steps_do_not_synchronise_between_logging_steps(tmp_path):
    """The steps that are not logged run under ``torch.cuda.set_sync_debug_mode("error")`` from the first callback's
    ``on_train_batch_start`` to the last one's ``on_train_batch_end``, with the whole default callback list: every
    callback hook, training_step (loss, divergence check), backward, the fused AdamW step and the EMA update."""
    for precision in ("32-true", "bf16-mixed"):
        on = SyncDebugOn()
        try:
            fit_default_callbacks(tmp_path, "cuda", precision, on, SyncDebugOff())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert on.checked == 6  # steps 1, 2, 4, 5, 6, 8


# ---------------------------------------------------------------------------------------------- async checkpoints
def async_atomic_io():  # type: ignore[no-untyped-def]
    """Lightning's thread writer around the project's atomic writer (``trainer.plugins`` in a config:
    ``{class_path: lightning.pytorch.plugins.io.AsyncCheckpointIO, init_args: {checkpoint_io: {class_path:
    dico.checkpoints.AtomicCheckpointIO}}}``)."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from dico.checkpoints import AtomicCheckpointIO

    return AsyncCheckpointIO(AtomicCheckpointIO())


def test_async_checkpoints_are_atomic_writes_off_the_training_thread_and_resume_exactly(tmp_path, monkeypatch):
    """Through ``AsyncCheckpointIO(AtomicCheckpointIO())`` every file is written by the atomic writer (temp file,
    fsync, rename) in the writer thread, all of them are complete when ``fit`` returns, and a run interrupted at step
    4 and resumed from its asynchronously written ``last.ckpt`` ends where an uninterrupted run ends."""
    import threading

    import dico.checkpoints
    from tests.test_training import fit_to_last

    threads: list[str] = []
    real = dico.checkpoints.atomic_torch_save

    def recording(obj, path):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        real(obj, path)

    monkeypatch.setattr(dico.checkpoints, "atomic_torch_save", recording)
    from dico.checkpoints import AtomicCheckpointIO

    fit_to_last(tmp_path / "a", 7, [], plugins=[AtomicCheckpointIO()])
    saved_sync = len(threads)
    fit_to_last(tmp_path / "b", 4, [], every=4, plugins=[async_atomic_io()])
    fit_to_last(tmp_path / "b", 7, [], ckpt_path="last", every=4, plugins=[async_atomic_io()])
    assert saved_sync == 1 and threads[0] == threading.main_thread().name
    assert len(threads) >= 3 and all(t != threading.main_thread().name for t in threads[1:]), threads
    assert not list((tmp_path / "b").glob(".*partial*"))  # no temp file left: every write finished
    straight = read_checkpoint(tmp_path / "a" / "last.ckpt")
    resumed = read_checkpoint(tmp_path / "b" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 7
    for part in ("state_dict", "current_model_state"):
        for key, value in straight[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)


def test_async_checkpoints_still_refuse_diverged_weights(tmp_path):
    """The weight check runs while the checkpoint is assembled, on the training thread, before anything is handed to
    the writer thread: diverged weights stop training and no file holding them is written."""
    from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint

    from dico.divergence import weights_are_sound
    from dico.module import DivergedWeightsError

    def blow_up(trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == 3:  # one weight far beyond max_abs_weight; the loss stays finite
            pl_module.model.head.proj.weight.data[0, 0] = 5e3

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=10,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        plugins=[async_atomic_io()],
        callbacks=[EMA(decay=0.9), ckpt, LambdaCallback(on_train_batch_start=blow_up)],
    )
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3, max_abs_weight=1e3)
    # the loss/weight check of step 3 (every step) is read when step 4's checkpoint is assembled
    with pytest.raises(DivergedWeightsError, match=r"step 3: max \|w\| = 5\d\d\d.*step 4 was not written"):
        trainer.fit(module, DigitsDataModule(batch_size=512, val_fraction=0.1))
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) >= 3 and not list(tmp_path.glob(".*partial*"))
    for path in files:
        ckpt_file = read_checkpoint(path)
        assert ckpt_file["global_step"] <= 3
        assert weights_are_sound(ckpt_file["state_dict"], 1e3) and weights_are_sound(
            ckpt_file["current_model_state"], 1e3
        )


# ---------------------------------------------------------------------------------------------- compile
# Dynamo and AOTAutograd build the forward and backward graphs Inductor would compile, run with eager kernels: the
# capture (graph breaks, guards, state-dict keys, EMA copies) in seconds. Inductor's own code generation takes
# minutes on a CPU and is measured on GPUs (benchmarks/gpu_fit.py, speed.py --compile on).
CAPTURE_ONLY = {"backend": "aot_eager"}


@pytest.mark.slow  # ~30 s of CPU (graph capture of forward, backward and sampling shapes), ~70 s on a loaded machine
def test_compiled_model_trains_checkpoints_resumes_and_samples_like_the_eager_one(tmp_path):
    """``compile`` compiles the backbone in place: the same loss and gradients as eager within fp32 rounding, a fit
    with EMA and ``last.ckpt`` whose keys are the eager model's (no ``_orig_mod.``), checkpoints that load and resume
    both ways (compiled -> eager, eager -> compiled), and the same samples from the same weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.numerics import assert_close

    torch.manual_seed(0)
    eager = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3)
    compiled = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3, compile=CAPTURE_ONLY)
    compiled.load_state_dict(eager.state_dict())
    batch = {"x": torch.randn(16, 1, 8, 8), "y": torch.arange(16) % 10}
    for m in (eager, compiled):
        m._losses(batch, m._generator(1, 0, 0, 0), train=True)["loss"].backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert_close(b.grad, a.grad, layers=40, msg=name)  # forward and backward through the whole model

    def fit(module: DiffusionModule, root: Path, steps: int, ckpt_path: str | None = None) -> Path:
        keeper = ModelCheckpoint(dirpath=root, save_last=True)
        cpu_trainer(root, steps, [EMA(decay=0.9), keeper]).fit(
            module, DigitsDataModule(batch_size=64, val_fraction=0.1), ckpt_path=ckpt_path
        )
        return root / "last.ckpt"

    def module(compile_: bool) -> DiffusionModule:
        torch.manual_seed(0)
        return DiffusionModule(
            "DiCo-S",
            model_kwargs=TINY_MODEL,
            lr=1e-3,
            sampling_steps=5,
            cfg_scale=2.0,
            compile=CAPTURE_ONLY if compile_ else False,
        )

    from_compiled = fit(module(True), tmp_path / "c", 2)
    saved = read_checkpoint(from_compiled)
    assert set(saved["state_dict"]) == set(eager.state_dict()) == set(saved["current_model_state"])
    to_eager = fit(module(False), tmp_path / "c", 3, ckpt_path=str(from_compiled))  # compiled -> eager resume
    from_eager = fit(module(False), tmp_path / "e", 2)
    to_compiled = fit(module(True), tmp_path / "e", 3, ckpt_path=str(from_eager))  # eager -> compiled resume
    a, b = (read_checkpoint(p) for p in (to_eager, to_compiled))
    assert a["global_step"] == b["global_step"] == 3
    for key, value in a["state_dict"].items():  # the same three steps, one half compiled in each run
        assert_close(b["state_dict"][key], value, layers=40, msg=key)

    samples = {}
    for compile_ in (False, True):
        m = DiffusionModule.load_from_checkpoint(
            to_eager, weights_only=True, compile=CAPTURE_ONLY if compile_ else False
        )
        samples[compile_] = m.sample([0, 1, 2], seed=1)
    assert_close(samples[True], samples[False], layers=200)  # 5 guided sampling steps through the whole model


def test_the_step_where_training_stops_logs_its_own_loss(tmp_path):
    """Losses are logged only on logging steps, but Lightning also writes the logs of the step where training stops
    (preemption, a callback's ``should_stop``): that row holds that step's loss, not an earlier step's."""
    import csv

    class StopAfter(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.losses.append(float(outputs["loss"]))
            if trainer.global_step == 6:
                trainer.should_stop = True

    stop = StopAfter()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=20,
        log_every_n_steps=4,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[stop],
    )
    torch.manual_seed(0)
    trainer.fit(DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3), DigitsDataModule(batch_size=64))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(rows) == [3, 5]  # the logging step (3 + 1) % 4 == 0, and the step training stopped at
    assert rows[3] == pytest.approx(stop.losses[3]) and rows[5] == pytest.approx(stop.losses[5])
