"""Runs read back: a run's metrics CSV as curves, the quickstart trained (or loaded), sample grids per class."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dico.module import DiffusionModule

#: The quickstart cut down to CI size: an overlay on experiments/quickstart.yaml (packaged with dico)
TINY_QUICKSTART = Path(__file__).with_name("quickstart-tiny.yaml")


def quickstart_config() -> Path:
    """``experiments/quickstart.yaml`` of the checkout (:func:`~dico.analysis.notebook.checkout_root`)."""
    from dico.analysis.notebook import checkout_root

    return checkout_root() / "experiments" / "quickstart.yaml"


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
def quickstart_args(steps: int | None = None, eval_every: int | None = None) -> list[str]:
    """``cli.py fit`` arguments of the quickstart; with ``steps``, the CI-sized overlay :data:`TINY_QUICKSTART`
    for ``steps`` training steps with a digits FID every ``eval_every`` steps (default: half of them)."""
    args = ["-c", str(quickstart_config())]
    if steps is not None:
        every = eval_every or max(1, steps // 2)
        args += [
            "-c",
            str(TINY_QUICKSTART),
            "--trainer.max_steps",
            str(steps),
            "--trainer.val_check_interval",
            str(every),
        ]
    return args


def train_quickstart(
    workdir: str | Path, steps: int | None = None, eval_every: int | None = None, timeout: float | None = None
) -> Path:
    """Run ``python cli.py fit`` on the quickstart (``steps``: the CI-sized overlay, see :func:`quickstart_args`) in
    ``workdir``; returns the run folder.

    The config's relative paths (``runs/quickstart``, the digits reference and classifier) land in ``workdir``.
    A separate process, as the README runs it, with this process's number of torch threads; its output is shown if
    it fails.
    """
    from dico.analysis.notebook import checkout_root

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = checkout_root()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # as many threads as this process uses
    command = [sys.executable, str(root / "cli.py"), "fit", *quickstart_args(steps, eval_every)]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"quickstart training failed (exit {proc.returncode}):\n{tail}")
    return run_dir_of(workdir)


def run_dir_of(workdir: str | Path) -> Path:
    """Where the quickstart run from ``workdir`` writes (its ``trainer.default_root_dir``; the tiny overlay keeps
    it)."""
    import yaml

    return Path(workdir) / yaml.safe_load(quickstart_config().read_text())["trainer"]["default_root_dir"]


def train_or_load_quickstart(
    workdir: str | Path, steps: int | None = None, eval_every: int | None = None
) -> tuple[DiffusionModule, Path, bool]:
    """The quickstart's model: loaded from ``<run>/checkpoints/last.ckpt`` if it exists, else trained first
    (``steps``/``eval_every``: the CI-sized run, see :func:`quickstart_args`).

    Returns (module with EMA weights, run folder, whether it was trained now).
    """
    from dico.sample_jobs import load_module

    run_dir = run_dir_of(workdir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trained = not ckpt.exists()
    if trained:
        run_dir = train_quickstart(workdir, steps, eval_every)
    return load_module(str(ckpt)).eval(), run_dir, trained


@torch.no_grad()
def class_grid(
    module: DiffusionModule, per_class: int, seed: int = 0, steps: int | None = None, num_classes: int | None = None
) -> np.ndarray:
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
    "TINY_QUICKSTART",
    "Curve",
    "class_grid",
    "quickstart_args",
    "quickstart_config",
    "read_metrics",
    "run_dir_of",
    "smooth",
    "tile",
    "train_or_load_quickstart",
    "train_quickstart",
]
