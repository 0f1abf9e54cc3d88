"""The prepared device benchmarks run end to end on the CPU at tiny sizes (their logic, not their speed)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

GPU_FIT = str(ROOT / "benchmarks" / "gpu_fit.py")


def measured(path: Path) -> dict[str, dict]:
    """``--json``'s JSON lines, merged per phase."""
    found: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        found.setdefault(row.pop("phase"), {}).update(row)
    return found


def table(stdout: str) -> dict[str, str]:
    lines = stdout[stdout.index("quantity") :].splitlines()[1:]
    return {" ".join(line.split()[:-1]): line.split()[-1] for line in lines if line and not line.startswith("[")}


def test_gpu_fit_dry_run_prints_every_phase_with_positive_numbers(tmp_path):
    """``benchmarks/gpu_fit.py --dry-run``: setup, the bare step and ``cli.py fit`` in both precisions (start-up,
    steady img/s, a window with the one logging step and one with the ``last.ckpt`` write, the end of fit) and
    sampling as ``sample`` runs it, each a number in the final table and in its JSON lines."""
    out = tmp_path / "gpu_fit.jsonl"
    run = subprocess.run(
        [sys.executable, GPU_FIT, "--dry-run", "--fork", "--json", str(out), "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = table(run.stdout)
    expected = [
        "setup seconds",
        *(
            f"{kind} {p} {q}"
            for p in ("32-true", "bf16-mixed")
            for kind, q in [
                ("bare", "img/s"),
                ("bare", "img/s with EMA"),
                ("fit", "start-up to the first step, s"),
                ("fit", "img/s"),
                ("fit", "fit / bare step"),
                ("fit", "last.ckpt write, s"),
                ("fit", "last.ckpt, GB"),
                ("fit", "last.ckpt write, GB/s"),
                ("fit", "end of fit after the last step, s"),
            ]
        ),
        "sampling bare model calls, samples/s",
        "sampling DiffusionModule.sample, samples/s",
        "sampling cli.py sample predict loop, samples/s",
        "sampling cli.py sample in all, s",
    ]
    for name in expected:
        assert float(rows[name]) > 0, (name, rows.get(name))
    for p in ("32-true", "bf16-mixed"):  # excesses over steady steps: a sign either way on a noisy CPU
        assert math.isfinite(float(rows[f"fit {p} logging step, s over a steady step"]))
        assert math.isfinite(float(rows[f"fit {p} peak GiB, with logging and save"]))
    found = measured(out)
    assert found["fit 32-true"]["ckpt_gb"] > 0 and math.isfinite(found["fit bf16-mixed"]["img_per_s"])
    assert (tmp_path / "work" / "run-bf16-mixed" / "checkpoints" / "last.ckpt").is_file()
    # the dry run's windows: warm-up 2, steady 7, logging window 10 (its middle: batch 14), save window 10
    with open(tmp_path / "work" / "run-32-true" / "csv" / "metrics.csv") as f:
        logged = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert logged == {14}, logged  # the one logging step, inside the logging window


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes that contain ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(li for li in (proc / "status").read_text().splitlines() if li.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_gpu_fit_cut_keeps_its_rows_and_leaves_no_process(tmp_path):
    """Phases past their limits (bare 3 s, fit 2 s with a loader worker; 100,000 timed steps, more than any machine
    runs in seconds, so neither phase's img/s is ever reached) are ended with their whole process groups; the script
    cut by SIGINT (as ``timeout`` sends) next ends the phase it is in (the same way), prints the table of what was
    measured (the rest: missing) and exits 124; the rows measured before (setup) are in ``--json``, outside the work
    folder, which is removed. Phase limits that add up to more than ``--time-limit`` are refused before anything
    runs."""
    out, work = tmp_path / "rows.jsonl", tmp_path / "work"
    argv = [
        sys.executable,
        GPU_FIT,
        "--dry-run",
        "--fork",
        "--precisions",
        "32-true",
        "--num-workers",
        "1",
        "--json",
        str(out),
    ]
    refused = subprocess.run([*argv, "--time-limit", "400"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "more than --time-limit 400 s" in refused.stderr, refused.stderr[-2000:]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the work folder: a temporary one, named for the check below
    proc = subprocess.Popen(
        [*argv, "--limits", '{"bare": 3, "fit": 2}', "--steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    printed = []
    for line in proc.stdout:  # type: ignore[union-attr]
        printed.append(line)
        if line.startswith("== fit 32-true: ended"):
            proc.send_signal(signal.SIGINT)  # in the sampling phase, or just before it
    status = proc.wait(120)
    text = "".join(printed)
    assert status == 124, text[-3000:]
    assert "== bare 32-true: ended (time limit)" in text and "== fit 32-true: ended (time limit)" in text
    assert "[gpu_fit] cut by SIGINT" in text, text[-3000:]
    assert not processes_naming(str(tmp_path)), processes_naming(str(tmp_path))
    rows = table(text)
    assert float(rows["setup seconds"]) > 0
    never_reached = ("bare 32-true img/s", "fit 32-true img/s", "fit 32-true last.ckpt write, s")
    assert [rows[name] for name in never_reached] == ["missing"] * 3
    found = measured(out)
    assert found["setup"]["seconds"] > 0
    assert not any("img_per_s" in found.get(phase, {}) for phase in ("bare 32-true", "fit 32-true"))
    assert not list(tmp_path.glob("gpu_fit-*")), "the temporary work folder is removed"
    assert not work.exists()


def test_speed_profile_splits_a_training_step_by_group(tmp_path):
    """``speed.py --profile`` on the CPU at tiny size: one training step of DiT-S/2 and of DiCo-S, each split into the
    groups; what each model is made of shows (attention in DiT only, depthwise convs and 1x1 convs in DiCo only),
    the optimizer in both, and the groups (idle gaps included) add up to the step."""
    out = tmp_path / "profile.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "speed.py"),
            "--models",
            "S",
            "--modes",
            "--profile",
            "--device",
            "cpu",
            "--batch-train",
            "2",
            "--image-size",
            "64",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    meta, row = (json.loads(line) for line in out.read_text().splitlines())
    assert meta["meta"]["args"]["profile"] and row["profile"]["batch"] == 2
    dit, dico = row["profile"]["DiT-S/2"], row["profile"]["DiCo-S"]
    assert dit["groups_ms"]["attention"] > 0 and dico["groups_ms"]["attention"] == 0
    assert dico["groups_ms"]["conv depthwise"] > 0 and dit["groups_ms"]["conv depthwise"] == 0
    assert dico["groups_ms"]["conv pointwise (1x1)"] > 0 and dit["groups_ms"]["conv pointwise (1x1)"] == 0
    for p in (dit, dico):
        assert p["groups_ms"]["optimizer"] > 0 and p["groups_ms"]["matrix products"] > 0
        assert sum(p["groups_ms"].values()) == pytest.approx(p["step_ms"], rel=0.05)
    assert "| conv depthwise |" in run.stdout and "bound: DiCo-S without it" in run.stdout
