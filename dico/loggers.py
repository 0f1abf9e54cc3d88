"""Loggers for long, resumed runs on cluster nodes.

- :class:`AutoWandbLogger`: wandb that never blocks: online when credentials exist and the server answers within
  seconds, otherwise offline (syncable later); one wandb run per run folder, continued by every resumed ``fit``,
  with ``validate``/``test`` runs grouped with it.
- :class:`LoggedConfig`: the whole composed config (and the global batch, parameter count and commit) in the run's
  wandb config.
- :class:`CSVLogger`: Lightning's CSV logger, but a resumed run appends to ``metrics.csv`` instead of deleting it.
"""

from __future__ import annotations

import csv
import json
import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

LEGACY_WANDB_HOST = "https://api.wandb.ai"
WANDB_RUN_FILE = "wandb-run.json"  # in the logger's save_dir (the run folder): the fit run's id and group


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
    ``wandb sync`` the run later. ``WANDB_MODE`` still wins.

    One wandb run per run folder: ``fit`` keeps its run's id in ``<save_dir>/wandb-run.json`` when the run starts,
    and a later ``fit`` in the folder (a resume after preemption) continues that run (``resume="allow"``) instead of
    starting another. ``validate``/``test`` (``job_type``, set by ``python cli.py`` to the command) get runs of their
    own in the fit run's ``group`` (the configured one, else the fit run's id), named ``<name> (<job_type>)``.
    """

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
        job_type: str = "fit",
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
        run_file = Path(save_dir) / WANDB_RUN_FILE
        fit_run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        if job_type == "fit":
            kwargs["id"] = kwargs.get("id") or fit_run.get("id") or new_run_id()
            group = group or fit_run.get("group") or kwargs["id"]
            self._run_record: dict[str, str] | None = {"id": kwargs["id"], "group": group}
        else:
            group = group or fit_run.get("group")
            name = f"{name} ({job_type})" if name else None
            self._run_record = None
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            group=group,
            tags=tags,
            offline=offline,
            log_model=log_model,
            job_type=job_type,
            **kwargs,
        )
        self._run_file = run_file

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The wandb run, started on first use. Its folder is made then, not when the logger is built (a ``fit`` that
        fails its checks leaves no folder behind: dico's ``Trainer.fit``), and a fit run's id goes to the folder."""
        if self.save_dir:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        run = WandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
        if self._run_record is not None:  # (the id of the run logged into: a run the user opened is reused)
            tmp = self._run_file.with_name(f".{self._run_file.name}.tmp")
            tmp.write_text(json.dumps({**self._run_record, "id": getattr(run, "id", None) or self._run_record["id"]}))
            os.replace(tmp, self._run_file)
            self._run_record = None
        return run


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


def new_run_id() -> str:
    """A wandb run id as wandb makes them: 8 random lowercase letters and digits."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def set_wandb_job_type(loggers: Any, command: str | None) -> None:
    """``python cli.py <command>``: the :class:`AutoWandbLogger` entries of a config's ``trainer.logger`` (before they
    are built) log to a wandb run of that job type (see :class:`AutoWandbLogger`)."""
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if str(getattr(logger, "class_path", "")).endswith("AutoWandbLogger") and command:
            logger.init_args.job_type = command


def run_summary(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """What the config does not say directly: the global batch (devices x nodes x batch size x accumulation), the
    world size, the parameter count, the code's commit, and notes on metrics whose unit needs one (callbacks'
    ``metric_notes``)."""
    from dico.profiling import count_parameters
    from dico.runtime import code_state

    datamodule = getattr(trainer, "datamodule", None)
    batch = getattr(datamodule, "batch_size", None)
    world = trainer.world_size
    notes: dict[str, str] = {}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        notes.update(getattr(callback, "metric_notes", None) or {})
    return {
        "global_batch": batch * world * trainer.accumulate_grad_batches if batch else None,
        "world_size": world,
        "parameters": count_parameters(pl_module.model if hasattr(pl_module, "model") else pl_module),
        **{k: v for k, v in code_state().items() if k != "changed"},
        "metric_notes": notes,
    }


class LoggedConfig(SaveConfigCallback):
    """LightningCLI's config file writer that also puts the whole composed config (model, data, trainer with its
    callbacks and loggers, seed, ...) and :func:`run_summary` into the wandb run's config, where the run is
    compared with others (Lightning logs only the model's hyper-parameters there)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        config = self.config.clone()
        config.pop("config", None)  # the -c file paths; their content is the rest
        logged = {
            **json.loads(self.parser.dump(config, format="json", skip_validation=True)),
            "run": run_summary(trainer, pl_module),
        }
        for logger in wandb_loggers:
            logger.experiment.config.update(logged, allow_val_change=True)
