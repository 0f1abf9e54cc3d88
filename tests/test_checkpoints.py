"""Atomic checkpoint files: a save killed midway leaves the previous checkpoint whole, wherever $TMPDIR is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dico.checkpoints import AtomicCheckpointIO, read_checkpoint
from tests.conftest import ROOT

# Saves a small checkpoint, then starts saving a 64 MB one and SIGKILLs itself as soon as the save shows on disk
# next to the target: a new non-empty file there, or any change to the target itself.
KILLED_SAVE = """
import importlib, os, signal, sys, threading, time
from pathlib import Path
import torch
module, name = sys.argv[2].rsplit(".", 1)
io = getattr(importlib.import_module(module), name)()
target = Path(sys.argv[1])
io.save_checkpoint({"step": 1, "w": torch.ones(4)}, target)
names, before = set(os.listdir(target.parent)), os.stat(target)
def changed():
    try:
        now = os.stat(target)
    except FileNotFoundError:
        return True
    if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
        return True
    return any(os.path.getsize(target.parent / n) for n in set(os.listdir(target.parent)) - names)
def watch():
    while not changed():
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGKILL)
sys.setswitchinterval(1e-4)
threading.Thread(target=watch, daemon=True).start()
io.save_checkpoint({"step": 2, **{f"w{i}": torch.zeros(2**19) for i in range(32)}}, target)
time.sleep(2)  # a save that never showed on disk is a failure of this probe, not of the writer
print("not killed")
"""


def killed_save(run_dir: Path, tmpdir: Path, io_class: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(run_dir / "last.ckpt"), io_class],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (tmpfs)")
def test_killed_save_across_filesystems_keeps_the_previous_checkpoint(tmp_path):
    """Run folder on /dev/shm, $TMPDIR on the disk (the cluster layout): SIGKILL during the save of a new checkpoint
    leaves the old one loadable and nothing in $TMPDIR; the next save clears the killed save's temporary file."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        run_dir, tmpdir = Path(shm) / "run", tmp_path / "tmpdir"
        run_dir.mkdir(), tmpdir.mkdir()
        if os.stat(run_dir).st_dev == os.stat(tmpdir).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the test's temporary folder")
        out = killed_save(run_dir, tmpdir, "dico.checkpoints.AtomicCheckpointIO")
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr[-2000:]
        saved = read_checkpoint(run_dir / "last.ckpt")
        assert saved["step"] == 1 and torch.equal(saved["w"], torch.ones(4))
        assert list(tmpdir.iterdir()) == []
        assert [p.name for p in run_dir.iterdir() if p.name != "last.ckpt"]  # the killed save's partial file
        AtomicCheckpointIO().save_checkpoint({"step": 3}, run_dir / "last.ckpt")
        assert [p.name for p in run_dir.iterdir()] == ["last.ckpt"]
        assert read_checkpoint(run_dir / "last.ckpt") == {"step": 3}


def test_failed_save_leaves_no_partial_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert read_checkpoint(tmp_path / "last.ckpt") == {"step": 1}


class NotAWeight:
    """A pickled object that weights-only loading refuses."""


def test_loading_is_weights_only_even_where_torch_would_default_to_full_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": NotAWeight()}, path)
    io = AtomicCheckpointIO()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # what Lightning's weights_only=None would obey
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        io.load_checkpoint(path)
    assert isinstance(io.load_checkpoint(path, weights_only=False)["extra"], NotAWeight)  # the explicit opt-in
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(io.load_checkpoint(path, map_location="cpu")["state_dict"]["w"], torch.ones(2))
