"""A row's SLURM job as submitit reads it (``sacct``; the local executor's own state): its record (``job.json``),
its state, and when a job that sacct does not know counts as gone."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from ablations.local import alive

#: submitit job states (sacct's, or the local executor's) of a job that waits for its (next) start, and of one that
#: runs; PREEMPTED as the last state is neither (a requeued job is PENDING or REQUEUED again)
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING", "READY")
RUNNING_STATES = ("RUNNING", "COMPLETING", "RESIZING")
#: a job sacct does not know (submitit's UNKNOWN) may be one just submitted, or one sacct has forgotten (or lost):
#: with no sign of life (submission, a write to its submitit folder) for this many hours it counts as GONE, and its
#: row is submitted again; ``run.py ... --forget`` submits it again at once
GONE_AFTER_HOURS = 24
#: a job still queued, running, or unknown to sacct for less than GONE_AFTER_HOURS: its row is not resubmitted
ACTIVE_STATES = (*QUEUED_STATES, *RUNNING_STATES, "UNKNOWN")


def job_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "job.json"
    return json.loads(path.read_text()) if path.exists() else None


def job_state(record: dict[str, Any]) -> tuple[str, str]:
    """(state, log path) of a submitted row's job, asked through submitit's own job object (sacct for SLURM; the
    controller's process for the local executor, which only the submitting host can see)."""
    from submitit.core.utils import JobPaths

    job_id, folder = str(record["job_id"]), record["folder"]
    log = str(JobPaths(folder, job_id=job_id, task_id=0).stdout)
    cluster = record.get("cluster", "slurm")
    if cluster == "slurm":
        from submitit.slurm.slurm import SlurmJob

        state = SlurmJob(folder, job_id).get_info(mode="force").get("State") or "UNKNOWN"
        return state.split()[0].upper(), log  # "CANCELLED by 123" -> CANCELLED
    if cluster == "local":
        from submitit.local.local import LocalJob

        state = LocalJob(folder, job_id).state  # without the process: FINISHED (a result pickle) or not
        if state != "FINISHED":
            same_host = record.get("host") == socket.gethostname()
            state = "RUNNING" if same_host and alive(int(job_id)) else "ENDED WITHOUT A RESULT"
        return state, log
    return "ENDED", log  # the debug executor runs its jobs inside the submitting process


def quiet_hours(record: dict[str, Any]) -> float:
    """Hours since the job's last sign of life: its submission, or the newest write to its submitit folder (the
    submitted pickle, the tasks' logs, the result)."""
    import calendar

    times = [calendar.timegm(time.strptime(record["submitted"], "%Y-%m-%d %H:%M:%S UTC"))]
    folder = Path(record["folder"].replace("%j", str(record["job_id"])))
    times += [p.stat().st_mtime for p in folder.glob("*")] if folder.is_dir() else []
    return (time.time() - max(times)) / 3600


def row_job(run_dir: Path) -> tuple[dict[str, Any], str, str] | None:
    """(job record, state, log) of the row's last job (``job.json``), None if it has none; the state is submitit's,
    or GONE for a job unknown to sacct with no sign of life for :data:`GONE_AFTER_HOURS`."""
    record = job_record(run_dir)
    if record is None:
        return None
    state, log = job_state(record)
    if state == "UNKNOWN" and quiet_hours(record) > GONE_AFTER_HOURS:
        state = "GONE"
    return record, state, log
