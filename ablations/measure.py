"""What the runner measures besides training: counts and a throughput ratio timed side by side.

A throughput taken alone measures the machine's load as much as the model, so a row is timed in interleaved turns
against its table's reference model (DiCo-S, at the row's own size) on the same device: each turn runs one forward
batch of each (in alternating order), and the ratio is the median over turns of the per-turn ratio -- as
``benchmarks/speed.py`` does. The attention kernel is pinned with ``torch.nn.attention.sdpa_kernel`` (the paper's
attention rows were not FlashAttention-accelerated: ``math`` by default) and recorded.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dico.models import create_model
from dico.profiling import count_macs, count_parameters

SDPA_KERNELS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def counts(model: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """#params and torchprofile MACs (the paper's "Gflops") of ``create_model(model, **model_kwargs)``."""
    with torch.device("meta"):
        net = create_model(model, **model_kwargs)
    net = net.to_empty(device="cpu")
    return {"params": count_parameters(net), "gmacs": count_macs(net, net.input_size, net.in_channels) / 1e9}


def _forward(net: nn.Module, batch: int, device: torch.device) -> Callable[[], None]:
    x = torch.randn(batch, net.in_channels, net.input_size, net.input_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, net.num_classes, (batch,), device=device)

    @torch.no_grad()
    def run() -> None:
        net(x, t, y)

    return run


def throughput_ratio(
    model: str,
    model_kwargs: dict[str, Any],
    reference: str,
    reference_kwargs: dict[str, Any],
    *,
    batch: int,
    turns: int,
    device: torch.device,
    sdpa: str = "math",
    seed: int = 0,
) -> dict[str, Any]:
    """Forward images/s of ``model`` and of ``reference`` timed in ``turns`` interleaved turns after a warm-up.

    Returns both throughputs (from the median times) and ``ratio``: the median over turns of reference time /
    model time (> 1: the model is faster).
    """
    torch.manual_seed(seed)
    nets = {"row": create_model(model, **model_kwargs), "ref": create_model(reference, **reference_kwargs)}
    fns = {k: _forward(n.to(device).eval(), batch, device) for k, n in nets.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"row": [], "ref": []}
    with sdpa_kernel(SDPA_KERNELS[sdpa]):
        for fn in fns.values():  # warm-up
            fn()
        for turn in range(turns):
            for key in ("row", "ref") if turn % 2 == 0 else ("ref", "row"):
                sync()
                start = time.perf_counter()
                fns[key]()
                sync()
                times[key].append(time.perf_counter() - start)
    ratio = statistics.median(r / m for r, m in zip(times["ref"], times["row"], strict=True))
    return {
        "throughput": batch / statistics.median(times["row"]),
        "reference_throughput": batch / statistics.median(times["ref"]),
        "throughput_ratio": ratio,
        "throughput_batch": batch,
        "throughput_turns": turns,
        "sdpa_kernel": sdpa,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def machine() -> str:
    """The machine a row ran on, in words."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}; Python {platform.python_version()}, torch {torch.__version__}"
