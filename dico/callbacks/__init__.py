"""Lightning callbacks: EMA weights, sample grids, preemption checkpoints, throughput."""

from .ema import EMA, ema_weights
from .preemption import PreemptionCheckpoint
from .sample_grid import SampleGrid
from .sample_writer import SampleWriter
from .throughput import Throughput

__all__ = ["EMA", "PreemptionCheckpoint", "SampleGrid", "SampleWriter", "Throughput", "ema_weights"]
