"""Lightning callbacks: EMA weights, FID evaluation, the held-out loss, sample grids and files, preemption
checkpoints, throughput."""

from .ema import EMA, ema_weights
from .fid import FIDEvaluation
from .heldout_loss import HeldOutLoss
from .preemption import PreemptionCheckpoint
from .sample_grid import SampleGrid
from .sample_writer import SampleWriter
from .throughput import Throughput

__all__ = [
    "EMA",
    "FIDEvaluation",
    "HeldOutLoss",
    "PreemptionCheckpoint",
    "SampleGrid",
    "SampleWriter",
    "Throughput",
    "ema_weights",
]
