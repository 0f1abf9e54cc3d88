"""The quickstart's time budget: the README's main command with every phase timed.

    python benchmarks/quickstart.py                           # the README command as written, in a temporary folder
    python benchmarks/quickstart.py --keep runs/bench-qs -- --trainer.max_steps 500   # extra `fit` options after --

Runs ``python cli.py fit -c experiments/quickstart.yaml [extra ...]`` in a subprocess (interpreter start included)
with a Lightning profiler that records the wall time of every hook, then prints where the time went (start-up,
reference statistics and the step-0 evaluation, training steps, validation, each periodic evaluation, sample grids,
checkpoints, the final samples) and checks the promise of the README: at least 95% of ``samples/final.npz``
classified as the digit asked for, by a classifier trained on the real digits with another seed than the one whose
features the FID uses (it never saw the samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dico.runtime import configure_cpu_threads  # noqa: E402

configure_cpu_threads()  # as cli.main does, before torch loads (the profiler below imports it)

from lightning.pytorch.profilers import Profiler  # noqa: E402

EVENTS: list[tuple[str, float, float]] = []  # (action, start in s since the child started, duration in s)
T0 = time.perf_counter()


class PhaseProfiler(Profiler):
    """Records (action, start, duration) of every profiled Lightning action into :data:`EVENTS`."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        self._open[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        started = self._open.pop(action_name, None)
        if started is not None:
            EVENTS.append((action_name, started - T0, time.perf_counter() - started))


def child(events_path: str, extra: list[str]) -> int:
    import cli

    args = ["fit", "-c", str(ROOT / "experiments" / "quickstart.yaml"), "--trainer.profiler", "__main__.PhaseProfiler"]
    code = cli.main([*args, *extra])
    Path(events_path).write_text(json.dumps({"events": EVENTS, "end": time.perf_counter() - T0}))
    return code


def phases(events: list[tuple[str, float, float]], end: float) -> list[tuple[str, float]]:
    """Sum the recorded actions into the quickstart's phases (callback names as Lightning's ``state_key``)."""

    def total(pred) -> float:
        return sum(d for a, _, d in events if pred(a))

    def calls(prefix: str, hook: str, min_s: float = 0.05) -> list[float]:
        return [d for a, _, d in events if a.startswith(f"[Callback]{prefix}") and a.endswith(hook) and d >= min_s]

    first = min((s for _, s, _ in events), default=end)
    rows = [("start-up (imports, config, model, data)", first)]
    rows.append(("reference statistics + evaluation at step 0", sum(calls("FIDEvaluation", ".on_train_start"))))
    rows.append(("training steps", total(lambda a: a == "run_training_batch")))
    rows.append(("validation", total(lambda a: a.startswith("[Strategy]") and a.endswith(".validation_step"))))
    for i, d in enumerate(calls("FIDEvaluation", ".on_train_batch_end") + calls("FIDEvaluation", ".on_train_end")):
        rows.append((f"periodic evaluation {i + 1}", d))
    rows.append(("sample grids", sum(calls("SampleGrid", ".on_train_batch_end"))))
    rows.append(("checkpoints", total(lambda a: a == "save_checkpoint")))
    rows.append(("final grid and samples", sum(calls("SampleGrid", ".on_fit_end"))))
    rows.append(("other (data, logging, Lightning, exit)", end - sum(d for _, d in rows)))
    return rows


def classify(npz: Path) -> float:
    import numpy as np
    import torch

    from dico.evaluation.digits import class_accuracy, train_digits_classifier

    judge, held_out = train_digits_classifier(seed=1)
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    print(f"judge: held-out accuracy on real digits {held_out:.1%}")
    return class_accuracy(judge, x, torch.from_numpy(labels))


def main() -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra options for `fit` (after --)")
    args = p.parse_args()
    if args.child:
        return child(args.child, args.extra)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dico-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    events_path = work / "phases.json"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(events_path), *args.extra]
    with open(work / "quickstart.log", "w") as log:  # the run's own output (progress bar, logs)
        code = subprocess.call(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if code != 0:
        print(f"the quickstart failed (exit {code}); see {work / 'quickstart.log'}", file=sys.stderr)
        return code
    recorded = json.loads(events_path.read_text())
    rows = phases([tuple(e) for e in recorded["events"]], recorded["end"])
    rows.append(("interpreter start and exit", wall - recorded["end"]))
    print(f"\n# quickstart phases ({work}; load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f})")
    print(f"| {'phase':<46} | {'seconds':>8} | {'share':>6} |\n|{'-' * 48}|{'-' * 10}:|{'-' * 7}:|")
    for name, seconds in rows:
        print(f"| {name:<46} | {seconds:8.1f} | {seconds / wall:6.1%} |")
    print(f"| {'**total wall**':<46} | {wall:8.1f} | {1:6.0%} |")
    run = work / "runs" / "quickstart"
    for record in sorted((run / "eval").glob("step_*.json")):
        metrics = json.loads(record.read_text())["metrics"]
        print(f"{record.stem}: digits FID {metrics['frechet_inception_distance']:.2f}")
    accuracy = classify(run / "samples" / "final.npz")
    verdict = "ok" if accuracy >= 0.95 else "BELOW the README's 95%"
    print(f"final samples recognised as the requested digit: {accuracy:.1%} ({verdict})")
    print(f"wall {wall / 60:.2f} min ({'within' if wall <= 300 else 'OVER'} the 5-minute budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
