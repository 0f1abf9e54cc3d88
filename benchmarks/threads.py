"""Training speed of the quickstart model under CPU thread settings, alone and beside competing work.

    python benchmarks/threads.py                 # alone, then beside 2 busy processes (a machine others share)
    python benchmarks/threads.py --load 0 4      # choose the competing loads

Each setting runs in a fresh interpreter (OpenMP reads its environment once, at start) and times training steps
(batch 128, the quickstart's model); settings alternate in turns and the table gives the median it/s per setting.
The settings: OpenMP's default (workers spin while they wait), ``OMP_WAIT_POLICY=PASSIVE`` (what the CLI sets, see
``dico.runtime``), and one thread.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "spinning (OpenMP default)": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive (dico CLI default)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}
PROBE = """
import time, torch
from dico.module import DiffusionModule
torch.manual_seed(0)
m = DiffusionModule(model_kwargs=dict(hidden_size=32, depth=[2, 2, 2, 2, 2], in_channels=1, input_size=8,
                                      num_classes=10))
opt = torch.optim.AdamW(m.model.parameters(), lr=1e-3)
batch, g = {"x": torch.randn(128, 1, 8, 8), "y": torch.randint(0, 10, (128,))}, torch.Generator().manual_seed(0)
for i in range(STEPS + 3):
    if i == 3:
        start = time.perf_counter()
    loss = m._losses(batch, g, True)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
print(STEPS / (time.perf_counter() - start))
"""


def busy(stop: mp.Event) -> None:  # type: ignore[valid-type]
    x = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        x = (x * 1103515245 + 12345) % 2**31


def its(setting: dict[str, str], steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(setting, DICO_CPU_TUNING="0", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PROBE.replace("STEPS", str(steps))], env=env, check=True, capture_output=True, text=True
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", type=int, nargs="+", default=[0, 2], help="competing busy processes")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    print(f"# {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; training steps/s (median of turns)")
    print("| competing busy processes | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for load in args.load:
        stop = mp.Event()
        workers = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(load)]
        for w in workers:
            w.start()
        try:
            runs: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for _ in range(args.turns):
                for name, setting in SETTINGS.items():
                    runs[name].append(its(setting, args.steps))
        finally:
            stop.set()
            for w in workers:
                w.join()
        print(f"| {load} | " + " | ".join(f"{statistics.median(r):.2f}" for r in runs.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
