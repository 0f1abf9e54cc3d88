"""The Lightning stack: module, EMA, exact resume, NaN handling, preemption, CLI strictness, DDP, wandb."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

import cli
from dico.callbacks import EMA, PreemptionCheckpoint, ema_weights
from dico.callbacks.named import CALLBACKS
from dico.checkpoints import AtomicCheckpointIO, read_checkpoint
from dico.data import DigitsDataModule
from dico.module import DiffusionModule, DivergedWeightsError, NonFiniteLossError
from tests.conftest import QUICKSTART, ROOT, TINY_MODEL, cpu_trainer
from tests.numerics import assert_close


def tiny_module(**kw) -> DiffusionModule:
    return DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3, **kw)


def trainer(tmp_path: Path, max_steps: int, callbacks: list, **kw) -> Trainer:
    return cpu_trainer(tmp_path, max_steps, callbacks, **kw)


def digits(batch_size: int = 512, num_workers: int = 0) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, val_fraction=0.1, num_workers=num_workers)  # 3 batches/epoch


class SigtermAfter(Callback):
    """Sends this process SIGTERM (a cluster preemption) after the n-th training batch of this fit."""

    def __init__(self, batches: int) -> None:
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.seen += 1
        if self.seen == self.batches:
            os.kill(os.getpid(), signal.SIGTERM)


def fit_to_last(
    root: Path,
    max_steps: int,
    callbacks: list,
    ckpt_path: str | None = None,
    num_workers: int = 0,
    every: int = 100,
    **kw,
) -> Trainer:
    """Fit with EMA, a ``last.ckpt`` keeper (every ``every`` steps and at the end) and the preemption save (listed
    first: it must still run after the EMA update)."""
    keeper = ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_last=True)
    t = trainer(root, max_steps, [*callbacks, PreemptionCheckpoint(), EMA(decay=0.9), keeper], **kw)
    torch.manual_seed(0)  # the same initial weights in every run
    t.fit(tiny_module(), digits(num_workers=num_workers), ckpt_path=ckpt_path)
    return t


@pytest.mark.parametrize(
    ("workers", "accumulate", "sigterm_after"),
    [(2, 1, None), (0, 1, 2), (0, 2, 4)],
    ids=["workers-mid-epoch", "sigterm-before-first-save", "sigterm-mid-accumulation"],
)
def test_exact_resume_matches_an_uninterrupted_run(tmp_path, workers, accumulate, sigterm_after):
    """7 optimizer steps straight == interrupted + resumed: live and EMA weights, optimizer, data order, RNG streams.

    Interrupted by max_steps=4 (mid-epoch 1, so the loader must restore the epoch before its workers prefetch),
    or by SIGTERM before any periodic save (then ``last.ckpt`` itself must be the newest checkpoint), or by SIGTERM
    after the first micro-batch of an accumulation (the save must wait for the optimizer step)."""
    kw = {"accumulate_grad_batches": accumulate, "num_workers": workers}
    fit_to_last(tmp_path / "a", 7, [], **kw)  # saves last.ckpt at the end only
    kw["every"] = 4 if sigterm_after is None else 100
    if sigterm_after is None:
        fit_to_last(tmp_path / "b", 4, [], **kw)
    else:
        with pytest.raises(SIGTERMException):
            fit_to_last(tmp_path / "b", 7, [SigtermAfter(sigterm_after)], **kw)
        saved = read_checkpoint(tmp_path / "b" / "last.ckpt")
        assert saved["global_step"] == (2 if accumulate == 1 else 3)  # after the step that was running
    t = fit_to_last(tmp_path / "b", 7, [], ckpt_path="last", **kw)
    assert t.global_step == 7
    assert not list((tmp_path / "b").glob("last-v*.ckpt"))  # last.ckpt itself is the newest
    straight = read_checkpoint(tmp_path / "a" / "last.ckpt")
    resumed = read_checkpoint(tmp_path / "b" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 7
    for part in ("state_dict", "current_model_state"):  # EMA weights, live weights
        for key, value in straight[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    live, ema = resumed["current_model_state"], resumed["state_dict"]
    assert not torch.equal(live["model.head.proj.weight"], ema["model.head.proj.weight"])  # EMA is not the live one
    adam_a, adam_b = (c["optimizer_states"][0]["state"] for c in (straight, resumed))
    for a, b in zip(adam_a.values(), adam_b.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_global_batch_says_so(tmp_path):
    """A run trained with 2 accumulated batches of 512 (as with 2 processes of 512) resumed with 1: it continues,
    warning with the old and the new global batch; resumed with the same global batch, it says nothing."""
    import warnings

    fit_to_last(tmp_path, 1, [], accumulate_grad_batches=2)
    message = r"resuming with a global batch of 512 = 512 \(batch_size\) x 1 \(processes\) x 1; the checkpoint was "
    with pytest.warns(UserWarning, match=message + r"trained with 1024 = 512 \(batch_size\) x 1 \(processes\) x 2\."):
        assert fit_to_last(tmp_path, 2, [], ckpt_path="last").global_step == 2
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        fit_to_last(tmp_path, 3, [], ckpt_path="last")
    assert not [w for w in said if "global batch" in str(w.message)]


def test_ema_follows_the_published_update(tmp_path):
    """ema_0 = initial weights; ema_k = d * ema_{k-1} + (1 - d) * w_k after every optimizer step."""
    seen: list[dict[str, torch.Tensor]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            seen.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    torch.manual_seed(0)
    module = tiny_module()
    expected = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer(tmp_path, 3, [Record(), EMA(decay=0.7)]).fit(module, digits())
    for weights in seen:
        expected = {k: 0.7 * expected[k] + 0.3 * weights[k] for k in expected}
    for key, value in module.model.state_dict().items():  # Lightning copied the average in at the end of fit
        assert_close(value, expected[key], layers=3, msg=key)  # three EMA updates
    assert not torch.equal(seen[-1]["head.proj.weight"], module.model.head.proj.weight)


def test_ema_weights_context_swaps_in_and_out(tmp_path):
    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            if trainer.global_step == 2:
                live = pl_module.model.head.proj.weight.detach().clone()
                ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
                average = ema._average_model.module.model.head.proj.weight.detach().clone()
                with ema_weights(pl_module):
                    assert torch.equal(pl_module.model.head.proj.weight, average)
                    with ema_weights(pl_module):  # nested use is a no-op
                        assert torch.equal(pl_module.model.head.proj.weight, average)
                assert torch.equal(pl_module.model.head.proj.weight, live) and not torch.equal(live, average)
                self.ran = True

    check = Check()
    trainer(tmp_path, 3, [EMA(decay=0.9), check]).fit(tiny_module(), digits())
    assert check.ran


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                batch["x"].fill_(float("nan"))

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*last\.ckpt.*--ckpt_path .*last\.ckpt"):
        trainer(tmp_path, 10, [EMA(decay=0.9), ckpt, Poison()]).fit(tiny_module(), digits())
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == 2
    # diverged before any checkpoint: the message says to start again, not to resume from a file that is not there
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*No checkpoint with sound weights.*start the run again"):
        trainer(tmp_path / "fresh", 10, [Poison()], enable_checkpointing=False).fit(tiny_module(), digits())
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_a_vae_that_cannot_be_loaded_offline_stops_before_the_first_step(tmp_path, monkeypatch):
    """Latent models decode their sample grids with the VAE: missing offline, that fails at setup (naming the
    data option that takes a local copy), not at the first grid after hours of training."""
    from dico.callbacks import SampleGrid
    from dico.pretrained import WeightsNotFoundError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    decoder = {"kind": "vae", "vae": "someone/a-vae-never-downloaded", "scale_factor": 0.18215}
    with pytest.raises(WeightsNotFoundError, match=r"a-vae-never-downloaded .*--data\.init_args\.vae PATH"):
        trainer(tmp_path, 2, [SampleGrid(every_n_steps=1)]).fit(tiny_module(decoder=decoder), digits())
    t = trainer(tmp_path, 1, [])  # nothing decodes: no VAE needed
    t.fit(tiny_module(decoder=decoder), digits())
    assert t.global_step == 1


def test_diverged_weights_stop_training_and_are_never_checkpointed(tmp_path):
    """Weights blown up during step 3 (the loss stays finite; the training-step check runs every 2 steps): the
    checkpoint of step 4 would hold them, so it is not written and training stops there, naming the step-3
    checkpoint; every file on disk, ``last.ckpt`` included, holds sound weights."""

    class Blowup(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.head.proj.weight[0, 0] = 5e3

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    module = tiny_module(check_finite_every_n_steps=2, max_abs_weight=1e3)
    with pytest.raises(
        DivergedWeightsError, match=r"step 4: max \|w\| = 5\d\d\d.*not written.*sound weights is (\S+);"
    ) as err:
        trainer(tmp_path, 10, [EMA(decay=0.9), ckpt, Blowup()]).fit(module, digits())
    named = Path(re.search(r"sound weights is (\S+);", str(err.value)).group(1))
    assert read_checkpoint(named)["global_step"] == 3
    files = sorted(tmp_path.glob("*.ckpt"))
    assert {p.name for p in files} == {"last.ckpt", *(f"epoch=0-step={k}.ckpt" for k in (1, 2, 3))}
    for path in files:
        saved = read_checkpoint(path)
        assert saved["global_step"] <= 3
        for part in ("state_dict", "current_model_state"):
            assert all(
                torch.isfinite(v).all() and v.abs().max() < 1e3 for v in saved[part].values() if v.is_floating_point()
            )


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_sigterm_or_a_time_limit_signal_saves_a_resumable_checkpoint_and_stops(tmp_path, monkeypatch, caplog, sig):
    """SIGTERM, or the signal a scheduler sends ahead of a time limit (SIGUSR1: Lightning's SLURM requeue signal,
    here inside a SLURM job, whose own handler would write an hpc_ckpt from inside the step and requeue; SIGUSR2:
    submitit's): last.ckpt at the step reached, the save logged with its duration, the process's handlers back."""
    for name, value in (
        ("SLURM_NTASKS", "1"),
        ("SLURM_JOB_NAME", "train"),
        ("SLURM_JOB_ID", "77"),
        ("SLURM_PROCID", "0"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "0"),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: Lightning's requeue would fail loudly
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}

    class Preempt(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.Signals[sig])

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100, save_last=True)
    t = trainer(tmp_path, 50, [EMA(decay=0.9), ckpt, Preempt(), PreemptionCheckpoint()], plugins=[AtomicCheckpointIO()])
    with pytest.raises(SIGTERMException), caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        t.fit(tiny_module(), digits())  # Lightning ends the process (SystemExit) after the step
    assert t.global_step == 2
    saved = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert saved["global_step"] == 2 and "current_model_state" in saved  # EMA and live weights both kept
    assert re.search(r"checkpoint \S+last.ckpt: [0-9.]+ GB, written in [0-9.]+ s", caplog.text), caplog.text
    assert f"{sig}: saved {tmp_path / 'ckpt' / 'last.ckpt'} at step 2" in caplog.text
    assert ("s after the signal" in caplog.text) == (sig != "SIGTERM")
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert {s: signal.getsignal(s) for s in before} == before
    t2 = trainer(tmp_path, 4, [EMA(decay=0.9), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    t2.fit(tiny_module(), digits(), ckpt_path="last")
    assert t2.global_step == 4


def test_data_that_does_not_fit_the_model_is_refused(tmp_path):
    module = DiffusionModule("DiCo-S", model_kwargs={**TINY_MODEL, "num_classes": 1000})
    with pytest.raises(ValueError, match=r"10 classes, the model 1000"):
        trainer(tmp_path, 1, []).fit(module, digits())
    module = DiffusionModule("DiCo-S", model_kwargs={**TINY_MODEL, "in_channels": 4})
    with pytest.raises(ValueError, match="1 channels, the model takes 4"):
        trainer(tmp_path, 1, []).fit(module, digits())
    module = DiffusionModule("DiCo-S", model_kwargs={**TINY_MODEL, "input_size": 16})  # would sample 16x16
    with pytest.raises(ValueError, match=r"data is 8x8, the model is built for 16x16 \(set model_kwargs.input_size: 8"):
        trainer(tmp_path, 1, []).fit(module, digits())


def test_sample_uses_ema_weights_and_is_seeded(tmp_path):
    module = tiny_module(sampling_steps=5, cfg_scale=2.0, guidance_mode="all", clip_denoised=True)
    trainer(tmp_path, 2, [EMA(decay=0.9)]).fit(module, digits())
    a = module.sample([0, 1, 2], seed=1)
    b = module.sample([0, 1, 2], seed=1)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    assert not torch.equal(a, module.sample([0, 1, 2], seed=2))


def test_bf16_mixed_precision_trains_with_fp32_weights_and_ema(tmp_path):
    """precision="bf16-mixed": the forward runs in bf16 autocast, the weights, optimizer state and EMA stay fp32,
    the loss stays finite and falls, and a bf16 forward stays close to the fp32 one."""

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.values.append(float(outputs["loss"]))

    torch.manual_seed(0)
    module, losses, ema = tiny_module(), Losses(), EMA(decay=0.9)
    trainer(tmp_path, 12, [ema, losses], precision="bf16-mixed").fit(module, digits(256))
    assert all(torch.isfinite(torch.tensor(losses.values)))
    assert sum(losses.values[-3:]) < sum(losses.values[:3]), losses.values
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    state = module.trainer.optimizers[0].state
    assert {v.dtype for s in state.values() for v in s.values() if v.ndim > 0} == {torch.float32}
    with ema_weights(module):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 5, 9])
    model = module.model.eval()
    with torch.no_grad():
        reference = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str, cwd: Path) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert cli.main(list(args)) == 0
    finally:
        os.chdir(old)


# The quickstart config with a tiny model and only the callbacks these tests need, the EMA and last.ckpt (the
# quickstart's end-to-end test runs all of them).
OFF = ("grid", "fid", "preemption", "throughput", "lr_monitor")
LIGHT_CALLBACKS = ["--ema.decay", "0.9", *(arg for key in OFF for arg in (f"--{key}", "null"))]
TINY_CLI = [
    "--model.model_kwargs",
    yaml.safe_dump(TINY_MODEL, default_flow_style=True).strip(),
    "--model.sampling_steps",
    "10",
    *LIGHT_CALLBACKS,
]


def test_fit_fast_dev_run_through_the_cli(tmp_path):
    run_cli(
        "fit",
        "-c",
        str(QUICKSTART),
        *TINY_CLI,
        "--trainer.fast_dev_run",
        "2",
        "--data.init_args.batch_size",
        "16",
        cwd=tmp_path,
    )


def test_fit_without_a_logger_runs_the_callbacks_that_need_none(tmp_path):
    """``trainer.logger: false``: the named learning-rate monitor (which needs a logger; on by default) is left out
    instead of failing at the first step."""
    args = ["--fid", "null", "--grid", "null", "--trainer.logger", "false", "--trainer.max_steps", "1"]
    run_cli("fit", "-c", str(QUICKSTART), *TINY_CLI[:-2], *args, "--data.init_args.batch_size", "16", cwd=tmp_path)
    assert not (tmp_path / "runs" / "quickstart" / "csv").exists()


def cli_status(*args: str, cwd: Path) -> int | None:
    """``cli.main``'s exit status (what ``python cli.py`` would exit with)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli.main(list(args))
    except SystemExit as e:  # what an uncaught SIGTERMException would end the process with
        return e.code
    finally:
        os.chdir(old)


def test_preempted_cli_run_exits_non_zero_and_resumes_in_place(tmp_path, monkeypatch):
    """``python cli.py fit`` preempted before its first periodic save: exit status 75, ``last.ckpt`` written
    through the atomic checkpoint IO; ``--ckpt_path last`` continues it, updates that same ``last.ckpt`` and keeps
    the metrics logged before the preemption in ``csv/metrics.csv``."""
    from dico.callbacks.preemption import PREEMPTED_EXIT_CODE

    saves = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        saves.append(path)
        return real_save(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    callbacks = ["--preemption", "PreemptionCheckpoint", "--checkpoint.every_n_train_steps", "100"]
    args = [
        "fit",
        "-c",
        str(QUICKSTART),
        *TINY_CLI,
        *callbacks,
        "--trainer.max_steps",
        "4",
        "--trainer.log_every_n_steps",
        "1",
        "--data.init_args.batch_size",
        "16",
    ]
    preempt = [{"class_path": "tests.test_training.SigtermAfter", "init_args": {"batches": 2}}]
    assert cli_status(*args, "--trainer.callbacks", json.dumps(preempt), cwd=tmp_path) == PREEMPTED_EXIT_CODE
    checkpoints = tmp_path / "runs" / "quickstart" / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    assert saves and all(Path(p).name == "last.ckpt" for p in saves)
    status = cli_status(*args, "--ckpt_path", "last", cwd=tmp_path)
    assert status in (0, None)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 4
    with open(tmp_path / "runs" / "quickstart" / "csv" / "metrics.csv", newline="") as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})
    assert steps == [0, 1, 2, 3]


def test_csv_logger_keeps_the_history_and_replaces_steps_logged_again(tmp_path):
    """A run killed at step 5 whose last checkpoint is step 3: the resumed run's rows replace steps 3-5."""
    from dico.loggers import CSVLogger

    first = CSVLogger(str(tmp_path), name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed = CSVLogger(str(tmp_path), name="csv", version="")
    for step in (3, 4):
        resumed.log_metrics({"train/loss": 10.0 + step, "train/grad_norm": 1.0}, step=step)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), float(r["train/loss"]), r["train/grad_norm"]) for r in csv.DictReader(f)]
    assert rows == [(0, 0.0, ""), (1, 1.0, ""), (2, 2.0, ""), (3, 13.0, "1.0"), (4, 14.0, "1.0")]


def test_cli_rejects_unknown_keys(tmp_path):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", str(QUICKSTART), "--trainer.max_stepz", "3", cwd=tmp_path)
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["learning_rate"] = 0.1
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", str(bad), cwd=tmp_path)


@pytest.mark.parametrize(
    "config", sorted(p for p in (ROOT / "experiments").glob("*.yaml") if p.stem != "base"), ids=lambda p: p.stem
)
def test_experiment_configs_parse_and_keep_the_paper_batch(config, capsys, paper):
    # the paper setups are overlays of experiments/base.yaml; the quickstart stands alone
    configs = [config] if config.stem == "quickstart" else [ROOT / "experiments" / "base.yaml", config]
    with pytest.raises(SystemExit) as done:
        cli.main(["fit", *(a for c in configs for a in ("-c", str(c))), "--print_config"])
    assert done.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    if config.stem == "quickstart":
        return
    t, m = resolved["trainer"], resolved["model"]
    global_batch = (
        t["num_nodes"] * t["devices"] * resolved["data"]["init_args"]["batch_size"] * t["accumulate_grad_batches"]
    )
    recipe = paper["table6_training"]["DiCo-H" if m["model"] == "DiCo-H" else "DiCo-S/B/L/XL"]
    assert global_batch == recipe["global_batch"]
    assert m["lr"] == recipe["lr"] and list(m["betas"]) == recipe["betas"] and m["weight_decay"] == 0
    assert m["warmup_steps"] == recipe["warmup_steps"]
    assert resolved["ema"]["init_args"]["decay"] == recipe.get("ema_decay", 0.9999)
    # one run folder, named once by the overlay, holds every output
    run_dir = t["default_root_dir"]
    assert run_dir == f"runs/{config.stem}"
    callbacks = [resolved[key] for key in CALLBACKS if resolved[key]]
    paths = [c["init_args"]["dirpath"] for c in callbacks if "dirpath" in c.get("init_args", {})]
    paths += [lg["init_args"]["save_dir"] for lg in t["logger"]]
    assert paths and all(p.startswith(run_dir) for p in paths)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "fit",
            "-c",
            str(QUICKSTART),
            *TINY_CLI,
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--data.init_args.batch_size",
            "16",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    saved = read_checkpoint(tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3


# ---------------------------------------------------------------------------------------------- wandb
def test_wandb_mode_follows_credentials(tmp_path, monkeypatch):
    import dico.loggers
    from dico.loggers import AutoWandbLogger, wandb_credentials_available

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(dico.loggers, "wandb_server_reachable", lambda url, timeout: True)
    assert not wandb_credentials_available()
    assert AutoWandbLogger(save_dir=str(tmp_path))._offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_available()
    assert not AutoWandbLogger(save_dir=str(tmp_path))._offline  # online, but nothing is sent until used
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert AutoWandbLogger(save_dir=str(tmp_path))._offline


@pytest.mark.parametrize("host", ["api.forge.coreweave.com", "api.wandb.ai"])
def test_wandb_credentials_stored_for_the_default_host_are_found(tmp_path, monkeypatch, host):
    """``wandb login`` (0.31) stores the key for its default server, api.forge.coreweave.com; keys stored for the
    W&B API host behind it (older wandb) still count, as wandb itself accepts them."""
    from dico.loggers import wandb_credentials_available

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    (tmp_path / "netrc").write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_credentials_available()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a self-hosted server: other credentials
    assert not wandb_credentials_available()


def test_wandb_with_credentials_but_no_network_trains_offline_within_seconds(tmp_path, monkeypatch):
    """A compute node without internet: the server (here TEST-NET-1, an address nothing answers on) cannot be
    reached, so the logger goes offline instead of waiting for wandb's 90 s init timeout."""
    import wandb

    from dico.loggers import AutoWandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "d" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://192.0.2.1")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    wandb.finish()  # an earlier test's run may still be open in this process (WandbLogger would reuse it)
    start = time.monotonic()
    logger = AutoWandbLogger(save_dir=str(tmp_path), probe_timeout=5.0)
    assert logger._offline
    t = Trainer(
        accelerator="cpu",
        max_steps=1,
        default_root_dir=tmp_path,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    t.fit(tiny_module(), digits(64))
    assert t.global_step == 1 and time.monotonic() - start < 15
    assert list((tmp_path / "wandb").glob("offline-run-*")) and logger.experiment.settings._offline
    wandb.finish()


def test_each_cli_run_in_one_process_has_its_own_wandb_run(tmp_path, monkeypatch):
    """Two commands in one process (a notebook, a job's fit then test): the second gets its own wandb run in its
    own folder instead of logging into the first, which Lightning's WandbLogger would leave open."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    one_step = ("fit", "-c", str(QUICKSTART), *TINY_CLI, "--trainer.max_steps", "1")
    one_step += ("--trainer.val_check_interval", "1", "--data.init_args.batch_size", "16")
    wandb.finish()  # a run an earlier test left open
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        run_cli(*one_step, cwd=tmp_path / name)
        assert wandb.run is None
    runs = [
        list((tmp_path / name / "runs" / "quickstart" / "wandb").glob("offline-run-*")) for name in ("first", "second")
    ]
    assert all(len(r) == 1 for r in runs) and runs[0][0].name.split("-")[-1] != runs[1][0].name.split("-")[-1]
    # a run the user opened before (Lightning's logger logs into it) is the user's to end
    (tmp_path / "mine").mkdir()
    mine = wandb.init(mode="offline", dir=tmp_path / "mine", project="mine")
    try:
        run_cli(*one_step, cwd=tmp_path / "mine")
        assert wandb.run is mine
    finally:
        wandb.finish()


def test_no_credentials_in_run_files(tmp_path, monkeypatch):
    secret = "s3cr3t" * 7
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_cli(
        "fit",
        "-c",
        str(QUICKSTART),
        *TINY_CLI,
        "--trainer.max_steps",
        "2",
        "--data.init_args.batch_size",
        "16",
        "--trainer.val_check_interval",
        "2",
        cwd=tmp_path,
    )
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".ckpt" for p in files)
    assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_resuming_with_another_models_optimizer_state_says_so(tmp_path):
    """A checkpoint whose optimizer moments belong to a differently ordered model (another version of the model
    code) is refused with the fix, not crashed on inside AdamW."""

    def make(max_steps: int) -> Trainer:
        return cpu_trainer(tmp_path, max_steps, [ModelCheckpoint(tmp_path / "ckpt", save_last=True)])

    make(1).fit(tiny_module(), DigitsDataModule(batch_size=16))
    checkpoint = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    moments = checkpoint["optimizer_states"][0]["state"]
    shapes = [p.shape for p in tiny_module().model.parameters()]
    i, j = 0, next(k for k, s in enumerate(shapes) if s != shapes[0])
    moments[i], moments[j] = moments[j], moments[i]  # two parameters trade places, as reordered code would
    torch.save(checkpoint, tmp_path / "reordered.ckpt")
    with pytest.raises(ValueError, match=r"optimizer state does not match this model .*--model\.pretrained"):
        make(2).fit(tiny_module(), DigitsDataModule(batch_size=16), ckpt_path=tmp_path / "reordered.ckpt")


# What each parameter of a DiT block was called before DiT's blocks became the shared adaLN block (the dico
# version before PRE_SHARED_BLOCK_KEY_MAP), and what it is called now: written out, not derived from the map.
OLD_DIT_BLOCK_KEYS = {
    "attn.qkv.weight": "mixer.qkv.weight",
    "attn.qkv.bias": "mixer.qkv.bias",
    "attn.proj.weight": "mixer.proj.weight",
    "attn.proj.bias": "mixer.proj.bias",
    "mlp.fc1.weight": "ffn.fc1.weight",
    "mlp.fc1.bias": "ffn.fc1.bias",
    "mlp.fc2.weight": "ffn.fc2.weight",
    "mlp.fc2.bias": "ffn.fc2.bias",
    "modulation.1.weight": "modulation.1.weight",
    "modulation.1.bias": "modulation.1.bias",
}


def test_dit_checkpoints_of_the_old_block_layout_load_and_resume(tmp_path):
    """A Lightning checkpoint of a DiT written with the old block keys (``blocks.i.attn.*``, ``blocks.i.mlp.*``) in
    its EMA ``state_dict`` and its live ``current_model_state`` loads for sampling, for ``--model.pretrained`` and
    resumes ``fit`` with both weight sets in place."""
    from dico.checkpoints import inspect_checkpoint, load_weights

    kwargs = {"hidden_size": 16, "depth": 2, "num_heads": 2, "in_channels": 1, "input_size": 8, "num_classes": 10}

    def dit() -> DiffusionModule:
        torch.manual_seed(0)
        return DiffusionModule("DiT-S/2", model_kwargs=kwargs, lr=1e-3)

    def make(max_steps: int) -> Trainer:
        return cpu_trainer(tmp_path, max_steps, [EMA(decay=0.5), ModelCheckpoint(tmp_path / "ckpt", save_last=True)])

    make(2).fit(dit(), DigitsDataModule(batch_size=16))
    new = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    old = dict(new)
    for part in ("state_dict", "current_model_state"):
        blocks = {
            f"model.blocks.{i}.{o}": f"model.blocks.{i}.{n}" for i in (0, 1) for o, n in OLD_DIT_BLOCK_KEYS.items()
        }
        others = [k for k in new[part] if not k.startswith("model.blocks.")]
        old[part] = {**{k: new[part][k] for k in others}, **{o: new[part][n] for o, n in blocks.items()}}
        assert len(old[part]) == len(new[part]) and any(".attn." in k for k in old[part])
    torch.save(old, tmp_path / "old.ckpt")

    loaded = DiffusionModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True, pretrained=None)
    ema = {f"model.{k}": v for k, v in loaded.model.state_dict().items()}
    assert ema.keys() == new["state_dict"].keys()
    assert all(torch.equal(ema[k], new["state_dict"][k]) for k in ema)

    net = DiffusionModule("DiT-S/2", model_kwargs=kwargs).model
    load_weights(net, inspect_checkpoint(str(tmp_path / "old.ckpt")))
    assert all(torch.equal(v, new["state_dict"][f"model.{k}"]) for k, v in net.state_dict().items())

    resumed = dit()
    make(3).fit(resumed, DigitsDataModule(batch_size=16), ckpt_path=tmp_path / "old.ckpt")
    assert resumed.global_step == 3  # optimizer state, live weights and EMA were all restored


def test_heldout_loss_scores_the_ema_weights_the_same_in_fit_and_test_and_moves_only_with_the_seed(tmp_path):
    """HeldOutLoss at the end of fit (EMA weights) and in ``test`` of its last.ckpt: bit-identical records; a rerun of
    the same seed too, also when it scored every step on the way; another training seed gives another score (the
    score's only source of variation)."""
    from dico.callbacks import HeldOutLoss
    from dico.data import ImageCropsDataModule

    def fit(root: Path, seed: int, every: int = 0) -> dict:
        keeper = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        heldout = HeldOutLoss(timesteps_per_sample=2, batch_size=32, every_n_steps=every)
        t = trainer(root, 2, [EMA(decay=0.9), heldout, keeper])
        torch.manual_seed(seed)
        module = DiffusionModule("DiCo-S", model_kwargs={**TINY_MODEL, "input_size": 16}, lr=1e-3, seed=seed)
        data = ImageCropsDataModule(train_per_image=8, heldout_per_image=4, batch_size=16, seed=seed)
        t.fit(module, data)
        return json.loads((root / "eval" / "heldout_step_0000002.json").read_text())

    first = fit(tmp_path / "a", 0)
    assert (
        first["settings"]["num_samples"] == 40
        and first["step"] == 2
        and set(first["metrics"]) == {"heldout_loss", "heldout_mse", "heldout_vb"}
    )
    assert fit(tmp_path / "b", 0, every=1)["metrics"] == first["metrics"]  # scoring on the way changes nothing
    assert (tmp_path / "b" / "eval" / "heldout_step_0000001.json").exists()
    assert fit(tmp_path / "c", 1)["metrics"]["heldout_mse"] != first["metrics"]["heldout_mse"]
    t = trainer(tmp_path / "a", 2, [HeldOutLoss(timesteps_per_sample=2, batch_size=32)])
    t.test(
        DiffusionModule("DiCo-S", model_kwargs={**TINY_MODEL, "input_size": 16}),
        ImageCropsDataModule(train_per_image=8, heldout_per_image=4, batch_size=16),
        ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"),
        verbose=False,
    )
    tested = json.loads((tmp_path / "a" / "test" / "heldout.json").read_text())
    assert tested["metrics"] == first["metrics"] and tested["step"] == 2


def test_heldout_loss_at_a_list_of_steps_keeps_the_scores_made_before_a_resume(tmp_path):
    """HeldOutLoss(steps=...) scores at each listed step (and at the end); a run stopped at step 3 and resumed from
    its last.ckpt to step 5 keeps the files of steps 1-3 as they were and adds 4 and 5: the row's scores along the
    way (ablations.curves.recorded_scores) are every step's, each made once."""
    from ablations.curves import recorded_scores
    from dico.callbacks import HeldOutLoss
    from dico.data import ImageCropsDataModule

    def fit(max_steps: int, ckpt_path: Path | None = None) -> None:
        keeper = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        heldout = HeldOutLoss(timesteps_per_sample=2, batch_size=32, steps=[1, 2, 4, 9])
        torch.manual_seed(0)
        module = DiffusionModule("DiCo-S", model_kwargs={**TINY_MODEL, "input_size": 16}, lr=1e-3, seed=0)
        data = ImageCropsDataModule(train_per_image=8, heldout_per_image=4, batch_size=16, seed=0)
        trainer(tmp_path, max_steps, [EMA(decay=0.9), heldout, keeper]).fit(module, data, ckpt_path=ckpt_path)

    fit(3)
    first = {p.name: p.read_text() for p in (tmp_path / "eval").glob("heldout_step_*.json")}
    assert sorted(first) == [f"heldout_step_000000{s}.json" for s in (1, 2, 3)]
    fit(5, tmp_path / "checkpoints" / "last.ckpt")
    assert {name: (tmp_path / "eval" / name).read_text() for name in first} == first  # kept, not rescored
    curve = recorded_scores(tmp_path)
    assert [p["step"] for p in curve] == [1, 2, 3, 4, 5]
    assert all(set(p["metrics"]) == {"heldout_loss", "heldout_mse", "heldout_vb"} for p in curve)
    assert len({p["metrics"]["heldout_mse"] for p in curve}) == 5  # each step's own weights
    with pytest.raises(ValueError, match="steps must be optimizer steps >= 1"):
        HeldOutLoss(steps=[0, 100])
