"""The prepared device benchmarks run end to end on the CPU at tiny sizes (their logic, not their speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_fit_dry_run_prints_every_phase_with_positive_numbers(tmp_path):
    """``benchmarks/gpu_fit.py --dry-run``: setup, the bare step and ``cli.py fit`` in both precisions (start-up,
    steady img/s, the ``last.ckpt`` write, the end of fit) and sampling as ``sample`` runs it, each a positive
    number in the final table and in its JSON."""
    out = tmp_path / "gpu_fit.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_fit.py"), "--dry-run", "--fork", "--json", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("quantity") :].splitlines()[1:]
    rows = {" ".join(line.split()[:-1]): line.split()[-1] for line in table if line and not line.startswith("[")}
    expected = [
        "setup seconds",
        *(f"{kind} {p} {q}" for p in ("32-true", "bf16-mixed") for kind, q in [
            ("bare", "img/s"), ("bare", "img/s with EMA"), ("fit", "start-up to the first step, s"),
            ("fit", "img/s"), ("fit", "fit / bare step"), ("fit", "last.ckpt write, s"), ("fit", "last.ckpt, GB"),
            ("fit", "last.ckpt write, GB/s"), ("fit", "end of fit after the last step, s")]),
        "sampling bare model calls, samples/s", "sampling DiffusionModule.sample, samples/s",
        "sampling cli.py sample predict loop, samples/s", "sampling cli.py sample in all, s",
    ]  # fmt: skip
    for name in expected:
        assert float(rows[name]) > 0, (name, rows.get(name))
    found = json.loads(out.read_text())
    assert found["fit 32-true"]["ckpt_gb"] > 0 and math.isfinite(found["fit bf16-mixed"]["img_per_s"])
    assert (tmp_path / "work" / "run-bf16-mixed" / "checkpoints" / "last.ckpt").is_file()
