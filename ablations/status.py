"""What the rows are doing and what they made: each row's status (finished, failed, pending, requeued, running, with
its real log), and the tables rebuilt from the finished runs (``collect``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ablations.rows import Row, canonical, rows_of
from ablations.slurm import job_record, job_state
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


QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING")


def row_status(row: Row, out: Path) -> str:
    """finished / failed / pending / requeued / running, with the job's real log (``<out>/submitit/<jobid>/...``)."""
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
    record = job_record(run_dir)
    if record is not None:
        return _job_status(run_dir, record, failed, done)
    if failed is not None:
        return f"failed (log: {failed['log']})"
    if (run_dir / "running.json").exists():
        holder = json.loads((run_dir / "running.json").read_text() or "{}")
        where = f"pid {holder.get('pid')} on {holder.get('host')}"
        return f"running ({where}" + (f", step {done[0]}, loss {done[1]:.4f})" if done else ")")
    if done is not None:
        return f"running or interrupted (step {done[0]}, loss {done[1]:.4f})"
    return "pending"


def _job_status(run_dir: Path, record: dict[str, Any], failed: dict | None, done: tuple[int, float] | None) -> str:
    state, log = job_state(record)
    job = f"job {record['job_id']} {state}"
    requeues = json.loads((run_dir / "requeued.json").read_text()) if (run_dir / "requeued.json").exists() else []
    if failed is not None:
        return f"failed ({job}; {failed.get('error', failed.get('stage'))}; log: {failed['log']})"
    step = f", step {done[0]}, loss {done[1]:.4f}" if done else ""
    if state in QUEUED_STATES:
        if requeues or state != "PENDING":
            step_ = checkpoint_step(run_dir)
            resume = "no last.ckpt yet, starts over" if step_ is None else f"resumes from step {step_}"
            return f"requeued ({job}, {len(requeues)} requeue(s), {resume}; log: {log})"
        return f"pending ({job}; log: {log})"
    if state in ("RUNNING", "COMPLETING", "RESIZING"):
        again = f", requeued {len(requeues)} time(s)" if requeues else ""
        return f"running ({job}{again}{step}; log: {log})"
    if state in ("UNKNOWN", "READY"):
        return f"submitted ({job}: not known to sacct yet{step}; log: {log})"
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


def collect(table: str, budget: str, out: Path, results_dir: Path, command: str, seeds: list[int] | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> list[Path]:  # fmt: skip
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
