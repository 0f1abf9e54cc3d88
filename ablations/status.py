"""What the rows are doing and what they made: each row's status (one word first, :func:`row_status`, then its job,
step and real log), and the tables rebuilt from the finished runs (``collect``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from ablations.jobs import GONE_AFTER_HOURS, QUEUED_STATES, RUNNING_STATES, quiet_hours, row_job
from ablations.local import alive
from ablations.rows import Row, canonical, rows_of
from ablations.stages import checkpoint_step


def progress(run_dir: Path) -> tuple[int, float] | None:
    """(step, last training loss) from the row's CSV log, if it has logged any."""
    import csv

    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return None
    step, loss = None, None
    with open(path) as f:
        for rec in csv.DictReader(f):
            if rec.get("train/loss"):
                step, loss = int(rec["step"]), float(rec["train/loss"])
    return None if step is None else (step, loss)  # type: ignore[return-value]


def row_status(row: Row, out: Path) -> str:
    """The row's status: its first word is one of

    - ``not submitted``: no job, no run, nothing trained;
    - ``queued``: its SLURM job waits for its first start;
    - ``requeued``: its job waits to start again after a time limit or preemption (resumes from ``last.ckpt``);
    - ``running``: its job runs (or a local run's process holds it), with the step and loss reached;
    - ``interrupted``: trained some steps, but no job or process holds it now: the next run resumes it;
    - ``finished``: ``result.json`` is written (with its score);
    - ``failed``: a stage failed, or the job ended without a result: the next run submits it again;
    - ``unknown``: sacct does not know its job (just submitted, or forgotten by sacct): not resubmitted, unless
      ``--forget`` or after :data:`ablations.jobs.GONE_AFTER_HOURS` without a sign of life;
    - ``gone``: unknown to sacct for longer than that: the next run submits it again.

    then the job, step and real log (``<out>/submitit/<jobid>/...``) in brackets."""
    run_dir = row.run_dir(out)
    if (run_dir / "result.json").exists():
        result = json.loads((run_dir / "result.json").read_text())
        metrics = result.get("metrics") or {}
        fid, heldout = metrics.get("frechet_inception_distance"), metrics.get("heldout_mse")
        if fid is not None:
            return f"finished (FID {fid:.2f})"
        return f"finished (held-out MSE {heldout:.5f})" if heldout is not None else "finished (counted)"
    failed = json.loads((run_dir / "failed.json").read_text()) if (run_dir / "failed.json").exists() else None
    done = progress(run_dir)
    step = f"step {done[0]}, loss {done[1]:.4f}" if done else ""
    job = row_job(run_dir)
    if job is not None:
        return _job_status(run_dir, *job, failed, step)
    if failed is not None:
        return f"failed (log: {failed['log']})"
    if (run_dir / "running.json").exists():
        holder = json.loads((run_dir / "running.json").read_text() or "{}")
        where = f"pid {holder.get('pid')} on {holder.get('host')}"
        if holder.get("host") != socket.gethostname() or alive(holder.get("pid", -1)):
            return f"running ({where}" + (f", {step})" if step else ")")
        return f"interrupted ({where} is gone" + (f", {step}" if step else "") + "; the next run resumes it)"
    if done is not None:
        return f"interrupted ({step}; the next run resumes it)"
    return "not submitted"


def _job_status(run_dir: Path, record: dict[str, Any], state: str, log: str, failed: dict | None, step: str) -> str:
    job = f"job {record['job_id']} {state}"
    requeues = json.loads((run_dir / "requeued.json").read_text()) if (run_dir / "requeued.json").exists() else []
    step = f", {step}" if step else ""
    if state in ("UNKNOWN", "GONE"):  # before failed.json: whether the row is resubmitted is what matters here
        quiet = f"job {record['job_id']} unknown to sacct, no sign of life for {quiet_hours(record):.1f} h"
        log = failed["log"] if failed is not None else log
        if state == "GONE":
            return f"gone ({quiet}, over {GONE_AFTER_HOURS} h: the next run submits it again{step}; log: {log})"
        return (
            f"unknown ({quiet}: counted as gone after {GONE_AFTER_HOURS} h, or submit it again now with --forget"
            f"{step}; log: {log})"
        )
    if failed is not None:
        return f"failed ({job}; {failed.get('error', failed.get('stage'))}; log: {failed['log']})"
    if state in QUEUED_STATES:
        if requeues or state.startswith("REQUEUE"):
            step_ = checkpoint_step(run_dir)
            resume = "no last.ckpt yet, starts over" if step_ is None else f"resumes from step {step_}"
            return f"requeued ({job}, {len(requeues)} requeue(s), {resume}; log: {log})"
        return f"queued ({job}; log: {log})"
    if state in RUNNING_STATES:
        again = f", requeued {len(requeues)} time(s)" if requeues else ""
        return f"running ({job}{again}{step}; log: {log})"
    return f"failed ({job} without a result{step}; log: {log})"


def finished_results(table: str, budget: str, out: Path) -> list[dict[str, Any]]:
    """Every finished run of the table's models at this budget (all seeds), wherever it was launched from."""
    models = {canonical(r.model) for r in rows_of(table, budget)}
    results = []
    for path in sorted((out / budget).glob("*/seed*/result.json")):
        result = json.loads(path.read_text())
        if canonical(result["model"]) in models:
            results.append(result)
    return results


def collect(
    table: str,
    budget: str,
    out: Path,
    results_dir: Path,
    command: str,
    seeds: list[int] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[Path]:
    """Rebuild the table from the finished runs of the requested ``seeds`` (all when None) made by the configs as
    they are now with the same ``overrides`` (:func:`ablations.provenance.select_runs`); the others are listed."""
    from ablations.provenance import select_runs
    from ablations.report import write_report

    results, left_out = select_runs(finished_results(table, budget, out), table, budget, seeds, list(overrides))
    for line in left_out:
        print(f"[ablations] left out: {line}", flush=True)
    paths = write_report(table, budget, results, results_dir, command, left_out)
    print("[ablations] wrote " + ", ".join(str(p) for p in paths), flush=True)
    return paths
