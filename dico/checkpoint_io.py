"""Atomic checkpoint files on any local filesystem layout (the run folder and ``$TMPDIR`` on different devices).

Lightning's default writer stages the file in ``$TMPDIR`` and moves it into place; across filesystems the move is
a copy over the old checkpoint, so a job killed during it leaves a truncated ``last.ckpt`` (and the staged copy in
``$TMPDIR``). :class:`AtomicCheckpointIO` writes a temporary file next to the target, fsyncs it and
``os.replace``-s it over the target: a reader sees the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_MARK = ".partial-"


def temp_path_for(path: Path) -> Path:
    """The hidden temporary file a save of ``path`` writes first (one per process)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.uname().nodename}-{os.getpid()}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically and durably: temp file beside it, fsync, rename, fsync the folder.

    Temporary files that killed saves of the same target left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{TEMP_MARK}"
    for stale in path.parent.iterdir():
        if stale.name.startswith(prefix):
            stale.unlink(missing_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, but atomic on local paths whatever ``$TMPDIR`` is (see module).

    Remote URLs (``s3://`` ...) keep Lightning's own transactional writer. Loading is ``weights_only`` unless the
    caller asks for full unpickling (``fit --weights_only false``, for files you trust): Lightning leaves the choice
    to torch's default, which an environment variable or an ``http(s)://`` path turns into full unpickling.
    ``python cli.py fit`` uses this plugin by default (``trainer.plugins``)."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        location = {} if map_location is None else {"map_location": map_location}  # else Lightning's default
        return super().load_checkpoint(path, weights_only=weights_only is not False, **location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None
