"""Loggers for long, resumed runs on cluster nodes.

- :class:`AutoWandbLogger`: wandb that never blocks: online when credentials exist and the server answers within
  seconds, otherwise offline (syncable later).
- :class:`CSVLogger`: Lightning's CSV logger, but a resumed run appends to ``metrics.csv`` instead of deleting it.
"""

from __future__ import annotations

import csv
import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

LEGACY_WANDB_HOST = "https://api.wandb.ai"


def wandb_base_url() -> str:
    """``WANDB_BASE_URL``, else the installed wandb's default server (``api.forge.coreweave.com`` since 0.31)."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL
    except ImportError:  # wandb < 0.31
        return LEGACY_WANDB_HOST
    return DEFAULT_BASE_URL


def _netrc_hosts(base_url: str) -> list[str]:
    """The netrc machine names wandb accepts for a server: its own, and for a CoreWeave Forge front the W&B API
    host behind it (where ``wandb login`` stored keys before 0.31)."""
    hosts = [urlsplit(base_url).netloc]
    try:
        from wandb.sdk.lib.urls import forge_upstream_url
    except ImportError:
        return hosts
    return [*hosts, urlsplit(forge_upstream_url(base_url)).netloc]


def wandb_credentials_available() -> bool:
    """An API key in ``WANDB_API_KEY`` or a ``~/.netrc`` (``$NETRC``) entry for the wandb server. The key itself
    is never read into our logs or configs."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entries = netrc.netrc(os.environ.get("NETRC"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(entries.authenticators(host) is not None for host in _netrc_hosts(wandb_base_url()) if host)


def wandb_server_reachable(base_url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the wandb server (or to ``$HTTPS_PROXY``) opens within ``timeout`` seconds,
    name lookup included. Compute nodes without internet fail this at once or after ``timeout``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy and urlsplit(base_url).scheme == "https" else base_url)
    if not target.hostname:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((target.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo itself has no timeout
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def open_wandb_run() -> Any:
    """The wandb run open in this process (``wandb.run``), or None; never imports wandb."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def finish_wandb_run(exit_code: int = 0, keep: Any = None) -> None:
    """End the wandb run still open in this process, if any, unless it is ``keep`` (a run the caller found open
    before, e.g. the user's own, which Lightning's logger logs into). Lightning's ``WandbLogger`` leaves its run
    open after ``fit``/``test``, and a later logger in the same process (a second ``cli.main`` in a notebook, a
    job's test stage) would silently log into it, its files in the first run's folder."""
    run = open_wandb_run()
    if run is not None and run is not keep:
        sys.modules["wandb"].finish(exit_code=exit_code)


class AutoWandbLogger(WandbLogger):
    """A :class:`WandbLogger` whose mode is chosen for you: ``offline=None`` means online if credentials are
    available and the server answers within ``probe_timeout`` seconds, else offline with a note on how to
    ``wandb sync`` the run later. ``WANDB_MODE`` still wins."""

    def __init__(
        self,
        project: str = "dico",
        name: str | None = None,
        save_dir: str = "runs",
        group: str | None = None,
        tags: list[str] | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        probe_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE")
        reason = "offline=True"
        if offline is None:
            offline = True
            if mode in ("offline", "dryrun", "disabled"):
                reason = f"WANDB_MODE={mode}"
            elif mode != "online" and not wandb_credentials_available():
                reason = "no wandb credentials"
            elif mode != "online" and not wandb_server_reachable(wandb_base_url(), probe_timeout):
                reason = f"{wandb_base_url()} did not answer within {probe_timeout:g} s"
            else:
                offline = False
        if offline:
            rank_zero_info(
                f"wandb: logging offline to {Path(save_dir) / 'wandb'} ({reason}). "
                f"Upload later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`."
            )
        # absolute: wandb's service process keeps the working directory it started in, so a relative folder would
        # put a later run of this process (after a chdir) in the first run's folder
        save_dir = str(Path(save_dir).resolve())
        super().__init__(
            project=project, name=name, save_dir=save_dir, group=group, tags=tags, offline=offline,
            log_model=log_model, **kwargs,
        )  # fmt: skip

    @property
    def experiment(self) -> Any:
        """Lightning's wandb run, its folder made when the run starts, not when the logger is built: a ``fit`` that
        fails its checks leaves no folder behind (dico's ``Trainer.fit``)."""
        if rank_zero_only.rank == 0 and self.save_dir:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        return super().experiment


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (and its columns) instead of deleting it. The rows of steps the resumed
    run logs again (a killed run got past its last checkpoint) are dropped at the first new row."""

    def _check_log_dir_exists(self) -> None:
        self._resumed_file = self._fs.isfile(self.metrics_file_path)
        if self._resumed_file:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._resumed_file and step is not None:
            self._resumed_file = False
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                rows = list(csv.DictReader(file))
            kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
            if len(kept) < len(rows):
                with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)
        super().log_metrics(metrics_dict, step)


class CSVLogger(LightningCSVLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` for resumable runs: with a fixed version
    (``version: ""``) a resumed run appends to the ``metrics.csv`` it finds rather than deleting it, so the curves
    keep their history (rows a killed run logged after its last checkpoint are replaced by the resumed run's).

    ``python cli.py`` uses it in place of Lightning's class in any config."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
