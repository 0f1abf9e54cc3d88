"""One run per folder: the lock a ``fit`` holds on its ``trainer.default_root_dir``.

Two ``fit`` runs in one folder (a job submitted twice, a SLURM array pointing at one folder) would interleave their
metrics and overwrite each other's ``config.yaml`` and ``last.ckpt``. Rank 0 takes :data:`LOCK_NAME` in the folder
before anything is written and removes it when the run ends, however it ends; a second ``fit`` into a busy folder
stops with one line naming the running one. The lock holds the holder's host, PID, start time and SLURM job, and
the holder touches it every :data:`HEARTBEAT_S` seconds. A lock is stale, and the next run takes it over with a note,
when its process is gone from this host, when it belongs to an earlier run of this same SLURM job (a requeued job),
or when it was not touched for :data:`STALE_AFTER_S` seconds (a run on another host that died without cleaning up).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from dico.runtime import slurm_job_id

LOCK_NAME = ".dico-run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten heartbeats missed


class RunFolderInUseError(FileExistsError):
    """Another live run holds the folder's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder's lock."""

    host: str
    pid: int
    since: str  # UTC, ISO 8601
    slurm_job: int | None = None

    @classmethod
    def this_process(cls) -> Holder:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(socket.gethostname(), os.getpid(), since, slurm_job_id())

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job is not None else ""
        return f"host {self.host}, PID {self.pid}{job}, since {self.since.replace('T', ' ')}"

    def why_stale(self, lock: Path, now: float | None = None) -> str | None:
        """Why the run holding ``lock`` is gone, or None if it may still be running."""
        me = Holder.this_process()
        if self.host == me.host and self.pid == me.pid:
            return "this process's own lock"
        if self.slurm_job is not None and self.slurm_job == me.slurm_job:
            return f"an earlier run of this SLURM job {me.slurm_job}"
        if self.host == me.host and not _process_alive(self.pid):
            return "its process is gone"
        try:
            idle = (time.time() if now is None else now) - lock.stat().st_mtime
        except FileNotFoundError:
            return "its lock is gone"
        if idle > STALE_AFTER_S:
            return f"its lock was last touched {idle / 60:.0f} min ago (stale after {STALE_AFTER_S / 60:.0f} min)"
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_holder(lock: Path) -> Holder | None:
    """The holder a lock file names (None if it is gone or unreadable: a lock written by no dico run)."""
    try:
        return Holder(**json.loads(lock.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _create(lock: Path, holder: Holder) -> bool:
    """Create ``lock`` naming ``holder``, complete or not at all (hard link of a written file); False if it exists."""
    staged = lock.with_name(f"{lock.name}.{holder.host}-{holder.pid}")
    staged.write_text(json.dumps(asdict(holder)))
    try:
        os.link(staged, lock)
        return True
    except FileExistsError:
        return False
    finally:
        staged.unlink(missing_ok=True)


def acquire(folder: Path) -> Holder:
    """Take ``folder``'s lock for this process (the folder is made if missing); a stale lock is taken over with a
    note. Raises :class:`RunFolderInUseError` naming the live holder and the fix."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = Holder.this_process()
    for _ in range(3):  # a lock removed or taken over between our reads: look again
        if _create(lock, me):
            return me
        holder = read_holder(lock)
        if holder is None:
            if not lock.exists():
                continue
            reason = "it names no run"
        elif (reason := holder.why_stale(lock)) is None:
            raise RunFolderInUseError(
                f"{folder} is in use by another fit ({holder.describe()}; lock {lock}): wait for that run to end or "
                f"give this one another --trainer.default_root_dir; if that run is gone, delete {lock}"
            )
        moved = lock.with_name(f"{lock.name}.stale-{me.host}-{me.pid}")
        try:
            os.rename(lock, moved)  # of several runs taking a stale lock over, one moves it away
        except FileNotFoundError:
            continue
        if read_holder(moved) != holder:  # another run took it over since we read it: give its lock back
            with suppress(FileExistsError):
                os.link(moved, lock)
            moved.unlink()
            continue
        moved.unlink()
        gone = holder.describe() if holder else "unknown"
        print(f"[dico] took over the lock of {folder} from a run that is gone ({gone}: {reason})")
    raise RunFolderInUseError(f"could not take the lock {lock}: other runs keep taking it; start one run per folder")


def release(folder: Path, holder: Holder) -> None:
    """Remove ``folder``'s lock if ``holder`` still holds it."""
    lock = folder / LOCK_NAME
    if read_holder(lock) == holder:
        lock.unlink(missing_ok=True)


@contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[Holder]:
    """Hold ``folder``'s lock (see module) for the ``with`` block, touching it every :data:`HEARTBEAT_S` seconds.
    A folder this call made is removed again if the block leaves it empty (a start that failed its checks)."""
    folder = Path(folder).absolute()
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    holder = acquire(folder)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with suppress(OSError):
                os.utime(folder / LOCK_NAME)

    thread = threading.Thread(target=heartbeat, name="dico-run-lock", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        release(folder, holder)
        for made_folder in made:  # only if empty, innermost first
            with suppress(OSError):
                made_folder.rmdir()
