"""Images/s logging through Lightning's ThroughputMonitor, configurable from YAML."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_size_of(batch: dict[str, Any]) -> int:
    return int(batch["y"].shape[0])


class Throughput(ThroughputMonitor):
    """Logs ``train|device/samples_per_sec`` (images/s) and friends every ``log_every_n_steps``."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=batch_size_of, window_size=window_size)
