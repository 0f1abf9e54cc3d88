"""wandb that never blocks: online when credentials exist, offline (syncable later) when they do not."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_credentials_available() -> bool:
    """An API key in ``WANDB_API_KEY`` or a ``~/.netrc`` entry for the wandb host. The key itself is never read
    into our logs or configs."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class AutoWandbLogger(WandbLogger):
    """A :class:`WandbLogger` whose mode is chosen for you: ``offline=None`` means online if credentials are
    available, else offline with a note on how to ``wandb sync`` the run later. ``WANDB_MODE`` still wins."""

    def __init__(
        self,
        project: str = "dico",
        name: str | None = None,
        save_dir: str = "runs",
        group: str | None = None,
        tags: list[str] | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode in ("offline", "dryrun", "disabled") or (
                mode != "online" and not wandb_credentials_available()
            )
        if offline:
            rank_zero_info(
                f"wandb: logging offline to {Path(save_dir) / 'wandb'} (no credentials or WANDB_MODE=offline). "
                f"Upload later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`."
            )
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            project=project, name=name, save_dir=save_dir, group=group, tags=tags, offline=offline,
            log_model=log_model, **kwargs,
        )  # fmt: skip
