"""Runs read back: a run's metrics CSV as curves, the quickstart trained (or loaded), sample grids per class."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from dico.module import DiffusionModule

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_CONFIG = ROOT / "experiments" / "quickstart.yaml"


@dataclass
class Curve:
    """One logged metric: ``values[i]`` was logged at global step ``steps[i]`` (in file order)."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> float:
        return float(self.values[-1])


def read_metrics(path: str | Path) -> dict[str, Curve]:
    """Every metric of a Lightning ``CSVLogger`` file (``csv/metrics.csv``) as a :class:`Curve`.

    Each row holds the metrics logged at one (step, epoch); cells of metrics not logged in that row are empty
    and are skipped, as are non-numeric cells. ``step`` and ``epoch`` are the x-axis, not curves.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "step" not in rows[0]:
        raise ValueError(f"{path} has no 'step' column: not a Lightning CSVLogger metrics file")
    points: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step_cell = row.get("step") or ""
        if not step_cell:
            continue
        step = int(float(step_cell))
        for key, cell in row.items():
            if key in ("step", "epoch") or key is None or cell in ("", None):
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            points.setdefault(key, []).append((step, value))
    return {
        key: Curve(np.array([s for s, _ in pts], dtype=np.int64), np.array([v for _, v in pts], dtype=np.float64))
        for key, pts in points.items()
    }


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start); same length as ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


# ---------------------------------------------------------------------------------------------- quickstart
def tiny_quickstart_config(config: dict[str, Any], steps: int = 60, eval_every: int = 30) -> dict[str, Any]:
    """The quickstart config (a parsed ``experiments/quickstart.yaml``) cut down for a CI-sized CPU run.

    ``steps`` training steps, FID on 50 samples of 10 sampling steps every ``eval_every`` steps (and at the
    start), 10-step samplers, two final samples per class, CSV logging only (no wandb run).
    """
    config = {**config, "trainer": dict(config["trainer"]), "model": dict(config["model"])}
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=eval_every, log_every_n_steps=max(1, min(5, steps // 10)),
                   enable_progress_bar=False)  # fmt: skip
    trainer["logger"] = [lg for lg in trainer["logger"] if lg["class_path"].endswith("CSVLogger")]
    callbacks = []
    for cb in trainer["callbacks"]:
        cb = {**cb, "init_args": dict(cb.get("init_args") or {})}
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "SampleGrid":
            cb["init_args"].update(every_n_steps=0, final_per_class=2)
        elif name == "FIDEvaluation":
            cb["init_args"].update(every_n_steps=eval_every, num_samples=50, batch_size=50, steps=10)
        elif name == "ModelCheckpoint":
            cb["init_args"].update(every_n_train_steps=steps)
        callbacks.append(cb)
    trainer["callbacks"] = callbacks
    config["model"]["sampling_steps"] = 10
    return config


def train_quickstart(workdir: str | Path, config: dict[str, Any] | None = None, timeout: float | None = None) -> Path:
    """Run ``python cli.py fit`` on the quickstart config (or ``config``) in ``workdir``; returns the run folder.

    The config's relative paths (``runs/quickstart``, the digits reference and classifier) land in ``workdir``.
    A separate process, as the README runs it, with this process's number of torch threads; its output is shown if
    it fails.
    """
    import yaml

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config is None:
        config, cfg_path = yaml.safe_load(QUICKSTART_CONFIG.read_text()), QUICKSTART_CONFIG
    else:  # outside workdir, which may be the checkout
        cfg_path = Path(tempfile.mkdtemp(prefix="dico-quickstart-")) / "quickstart.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # as many threads as this process uses
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "-c", str(cfg_path)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"quickstart training failed (exit {proc.returncode}):\n{tail}")
    return workdir / Path(config["trainer"]["default_root_dir"])


def run_dir_of(workdir: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Where a quickstart config run from ``workdir`` writes (``trainer.default_root_dir``)."""
    import yaml

    config = config or yaml.safe_load(QUICKSTART_CONFIG.read_text())
    return Path(workdir) / config["trainer"]["default_root_dir"]


def train_or_load_quickstart(
    workdir: str | Path, config: dict[str, Any] | None = None
) -> tuple[DiffusionModule, Path, bool]:
    """The quickstart's model: loaded from ``<run>/checkpoints/last.ckpt`` if it exists, else trained first.

    Returns (module with EMA weights, run folder, whether it was trained now).
    """
    from dico.sample_jobs import load_module

    run_dir = run_dir_of(workdir, config)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trained = not ckpt.exists()
    if trained:
        run_dir = train_quickstart(workdir, config)
    return load_module(str(ckpt)).eval(), run_dir, trained


@torch.no_grad()
def class_grid(module: DiffusionModule, per_class: int, seed: int = 0, steps: int | None = None,
               num_classes: int | None = None) -> np.ndarray:  # fmt: skip
    """Samples of every class as one image: row ``c`` holds ``per_class`` samples of class ``c``.

    Returns (classes * H, per_class * W, C) floats in [0, 1] (module's sampler, CFG and EMA weights).
    """
    k = num_classes or module.model.num_classes
    labels = torch.arange(k).repeat_interleave(per_class)
    images = module.sample(labels, seed=seed, steps=steps)  # (k * per_class, C, H, W) in [-1, 1]
    return tile(images, k, per_class)


def tile(images: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, C, H, W) in [-1, 1] -> (rows * H, cols * W, C) in [0, 1], row-major."""
    n, c, h, w = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows}x{cols} grid")
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu().view(rows, cols, c, h, w)
    return x.permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c).numpy()


__all__ = [
    "QUICKSTART_CONFIG",
    "Curve",
    "class_grid",
    "read_metrics",
    "run_dir_of",
    "smooth",
    "tile",
    "tiny_quickstart_config",
    "train_or_load_quickstart",
    "train_quickstart",
]
