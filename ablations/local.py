"""The local launcher: each row's stages as ``cli.py`` subprocesses on this machine, one invocation per row at a
time (``running.json``), then rank 0's record (:func:`ablations.stages.finalize`)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ablations.compose import resolve
from ablations.rows import ROOT, Row
from ablations.stages import finalize, stages, wandb_env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the training process gets SIGTERM (and checkpoints) when the runner is killed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def claim(run_dir: Path) -> bool:
    """Take the row for this process (``running.json``: host and pid), unless a live process already has it: two
    invocations sharing a row (DiCo-S is in both tables) never train it at once."""
    lock = run_dir / "running.json"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = json.loads(lock.read_text() or "{}")
            if holder.get("host") == me["host"] and alive(holder.get("pid", -1)) and holder["pid"] != me["pid"]:
                return False
            lock.unlink(missing_ok=True)  # left by a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (never true for 0 or a negative pid: those name groups)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    return True


def run_local(row: Row, out: Path, args: argparse.Namespace) -> bool:
    """Train, score and finalize one row in subprocesses of ``cli.py``; True when it finished (or another live
    invocation is training it)."""
    run_dir = row.run_dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not claim(run_dir):
        print(f"[ablations] {row.key}: being trained by another invocation; skipped here", flush=True)
        return True
    try:
        return _run_claimed(row, out, args)
    finally:
        (run_dir / "running.json").unlink(missing_ok=True)


def _run_claimed(row: Row, out: Path, args: argparse.Namespace) -> bool:
    from ablations.provenance import record_start

    run_dir = row.run_dir(out)
    (run_dir / "failed.json").unlink(missing_ok=True)
    record_start(run_dir)
    config = resolve(row, out, args.extra)
    log = run_dir / "run.log"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **wandb_env(row, out), "PYTHONPATH": path}
    for stage in stages(row, out, args.extra):
        print(f"[ablations] {row.key}: python cli.py {' '.join(stage)}", flush=True)
        with open(log, "a") as f:
            f.write(f"\n$ python cli.py {' '.join(stage)}\n")
            f.flush()
            code = subprocess.call(
                [sys.executable, str(ROOT / "cli.py"), *stage],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        if code != 0:
            (run_dir / "failed.json").write_text(json.dumps({"stage": stage[0], "returncode": code, "log": str(log)}))
            print(f"[ablations] {row.key}: {stage[0]} failed ({code}); see {log}", flush=True)
            return False
    finalize(row, out, config, args, args.extra)
    return True
