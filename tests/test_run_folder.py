"""One run per folder (the lock of ``trainer.default_root_dir``), and ``fit`` validating its inputs before it writes
anything: a failing start leaves the run folder as it found it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

import cli
from dico.checkpoints import resume_checkpoint
from dico.run_folder import LOCK_NAME, STALE_AFTER_S, Holder, RunFolderInUseError, acquire, read_holder, release
from tests.conftest import QUICKSTART, ROOT

HOLD = """
import sys, time
from dico.run_folder import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``folder``'s lock, as a running ``fit``'s rank 0 does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout.readline().strip() == "holding"
    return holder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fit_error(capsys, tmp_path: Path, *args: str) -> str:
    """``cli.py fit`` of the quickstart into ``tmp_path/run`` that must fail: its one error line (exit status 1)."""
    capsys.readouterr()
    argv = ["fit", "-c", str(QUICKSTART), "--trainer.default_root_dir", str(tmp_path / "run"), *args]
    assert cli.entry(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error:" in line]
    return line


def test_a_second_fit_into_a_busy_folder_stops_naming_the_running_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    holder = hold_lock(run, 60)
    try:
        before = files(run)
        line = fit_error(capsys, tmp_path)
        assert f"{run} is in use by another fit (host {socket.gethostname()}, PID {holder.pid}, since " in line
        assert "another --trainer.default_root_dir" in line and f"delete {run / LOCK_NAME}" in line
        assert files(run) == before  # nothing written by the second run
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (no clean-up): its lock names a process that is gone from this host
    assert read_holder(run / LOCK_NAME).pid == holder.pid
    with pytest.raises(ValueError, match=r"data\.batch_size is 0"):  # takes the lock over, then fails its checks
        cli.main(
            ["fit", "-c", str(QUICKSTART), "--trainer.default_root_dir", str(run), "--data.init_args.batch_size", "0"]
        )
    assert f"took over the lock of {run} from a run that is gone" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()


def test_only_one_of_two_processes_starting_together_gets_the_folder(tmp_path):
    run = tmp_path / "run"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD, str(run), "3"],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in starts]
    held = [out for out, _ in outs if out.startswith("holding")]
    refused = [err for _, err in outs if "RunFolderInUseError" in err and "is in use by another fit" in err]
    assert len(held) == 1 and len(refused) == 1, outs
    assert not (run / LOCK_NAME).exists()


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, capsys, monkeypatch):
    """Another host's lock is live while it is touched (the holder's heartbeat) and stale after STALE_AFTER_S; a lock
    of an earlier run of this SLURM job (a requeued job) is stale at once."""
    lock = tmp_path / LOCK_NAME
    elsewhere = Holder("node-b", 4242, "2026-01-01T00:00:00Z", slurm_job=17)
    lock.write_text(json.dumps(elsewhere.__dict__))
    with pytest.raises(RunFolderInUseError, match=r"host node-b, PID 4242, SLURM job 17, since 2026-01-01 00:00:00Z"):
        acquire(tmp_path)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    me = acquire(tmp_path)
    note = capsys.readouterr().out
    assert f"took over the lock of {tmp_path} from a run that is gone (host node-b, PID 4242" in note
    assert "its lock was last touched 11 min ago (stale after 10 min)" in note and read_holder(lock) == me
    release(tmp_path, me)
    assert not lock.exists()
    lock.write_text(json.dumps(elsewhere.__dict__))  # touched just now: live ...
    monkeypatch.setenv("SLURM_JOB_ID", "17")  # ... but this is SLURM job 17 again: its earlier run is gone
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert acquire(tmp_path).slurm_job == 17 == SLURMEnvironment.job_id()  # Lightning's reading of it
    assert "an earlier run of this SLURM job 17" in capsys.readouterr().out


def test_a_failing_start_writes_nothing(tmp_path, capsys, monkeypatch):
    """A missing checkpoint, batch_size 0, data that does not fit the model: one line naming the fix, and no run
    folder, config.yaml, wandb run, digits classifier or reference made."""
    monkeypatch.chdir(tmp_path)
    line = fit_error(capsys, tmp_path, "--ckpt_path", str(tmp_path / "run" / "nope.ckpt"))
    assert "nope.ckpt does not exist" in line and "--ckpt_path last" in line
    line = fit_error(capsys, tmp_path, "--data.init_args.batch_size", "0")
    assert "data.batch_size is 0" in line
    kwargs = {"hidden_size": 32, "depth": [2, 2, 2, 2, 2], "in_channels": 1, "input_size": 16, "num_classes": 10}
    line = fit_error(capsys, tmp_path, "--model.model_kwargs", json.dumps(kwargs))
    assert "the data is 8x8, the model is built for 16x16" in line
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_fid_reference_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "digits-reference.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))  # an image batch, not statistics
    partial = run / "checkpoints" / f".last.ckpt.partial-{socket.gethostname()}-1"  # a killed save's left-over
    partial.parent.mkdir()
    partial.write_bytes(b"half a checkpoint")
    before = files(run)
    line = fit_error(capsys, tmp_path)
    assert "digits-reference.npz is an ADM reference batch, not dico reference statistics" in line
    assert files(run) == {k: v for k, v in before.items() if "partial" not in k}  # only the stray save removed


def test_a_damaged_last_checkpoint_names_the_newest_sound_one(tmp_path, capsys, monkeypatch):
    """``--ckpt_path last`` onto a truncated ``last.ckpt``: exit status 1 (a requeue loop stops; 75 would rerun it),
    one line naming the newest checkpoint that reads and holds sound weights; nothing written."""
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    sound = {"state_dict": {"model.w": torch.ones(3)}, "pytorch-lightning_version": "2.6.0", "global_step": 2}
    torch.save(sound, checkpoints / "step=2.ckpt")
    torch.save({**sound, "state_dict": {"model.w": torch.full((3,), float("nan"))}}, checkpoints / "step=4.ckpt")
    torch.save(sound, checkpoints / "last.ckpt")
    (checkpoints / "last.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:300])  # killed mid-copy
    before = files(tmp_path / "run")
    line = fit_error(capsys, tmp_path, "--ckpt_path", "last")
    assert "last.ckpt is damaged and cannot be resumed" in line
    assert f"resume from the newest sound checkpoint with `--ckpt_path {checkpoints / 'step=2.ckpt'}`" in line
    assert files(tmp_path / "run") == before


def test_ckpt_path_resolution(tmp_path, golden):
    folder = tmp_path / "checkpoints"
    assert resume_checkpoint("last", [folder]) == "last"  # nothing to resume: the run starts afresh
    folder.mkdir()
    ours = {"state_dict": {"model.w": torch.ones(1)}, "pytorch-lightning_version": "2.6.0"}
    for name in ("last-v1.ckpt", "last.ckpt"):
        torch.save(ours, folder / name)
        time.sleep(0.01)
    assert resume_checkpoint("last", [folder]) == str(folder / "last.ckpt")  # the newest, as Lightning picks
    torch.save(golden["dico"]["state_dict"], tmp_path / "published.pt")
    with pytest.raises(ValueError, match=r"published checkpoint.*--model\.pretrained"):
        resume_checkpoint(tmp_path / "published.pt", [folder])
    assert resume_checkpoint(None, [folder]) is None


def test_fit_releases_the_folder_when_it_ends(tmp_path, capsys, monkeypatch):
    """A fit that ran (here: two steps) leaves no lock, so the next fit into the folder starts."""
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "-c",
        str(QUICKSTART),
        "--trainer.default_root_dir",
        "run",
        "--trainer.logger",
        "false",
        "--fid",  # (no digits reference and classifier to make: this test is about the lock)
        "null",
        "--grid",
        "null",
        "--trainer.fast_dev_run",
        "2",
        "--data.init_args.batch_size",
        "16",
    ]
    assert cli.main(args) == 0
    assert not (tmp_path / "run" / LOCK_NAME).exists()
