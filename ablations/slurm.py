"""The SLURM launcher (submitit): one job per row, submitted once across invocations and tables (``job.json``), its
shape (nodes x GPUs x tasks, CPUs) from the composed trainer config, requeued and resumed from ``last.ckpt`` on a
time limit or preemption (the job's state as submitit reads it: :mod:`ablations.jobs`).

A row is submitted once: its ``job.json`` names the job, and a row whose job is still queued or running (asked
through submitit's job object, i.e. ``sacct``) is reported, not resubmitted, from any table or invocation. Nor is one
whose job sacct does not know (just submitted, or forgotten), until ``--forget`` or
:data:`ablations.jobs.GONE_AFTER_HOURS` without a sign of life. Nodes x GPUs x tasks are the composed trainer's
(``--nodes``/``--gpus-per-node`` set both), CPUs per task default to ``data.num_workers + 1``. Timeouts and
preemption requeue and resume from ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ablations.compose import placement, resolve
from ablations.jobs import ACTIVE_STATES, GONE_AFTER_HOURS, row_job
from ablations.rows import ROOT, Row
from ablations.stages import checkpoint_step, finalize, stages, wandb_env


class RowJob:
    """A SLURM job (submitit) training one row: every task runs fit and test (Lightning's SLURM environment
    makes them one DDP group over all GPUs and nodes); rank 0 then finalizes.

    Stopped early, the job requeues through submitit and resumes from ``last.ckpt``; neither is a failure:

    - time limit (submitit's ``USR2``, ``--signal-delay`` seconds before it) or SIGTERM (preemption, ``scancel
      --signal TERM``) during training: Lightning finishes the step, :class:`dico.callbacks.PreemptionCheckpoint`
      saves ``last.ckpt`` there and ``cli.py`` exits with status 75; rank 0 then takes submitit's own
      checkpoint-and-requeue path: submitit calls :meth:`checkpoint`, which returns the same row as a
      :class:`submitit.helpers.DelayedSubmission`, and requeues the job (``scontrol requeue``; the local executor
      restarts it). The requeued job resumes from the step reached.
    - the signal outside training (start-up, the test stage): submitit's handler takes that path at once; the job
      resumes from the latest ``last.ckpt``.

    Each (re)start clears a stale ``failed.json``; only a stage that really fails writes one, with the task's log.
    """

    def __init__(self, row: Row, out: Path, args: argparse.Namespace, extra: list[str]) -> None:
        self.row, self.out, self.args, self.extra = row, out, args, extra
        self._requeued = False

    def __call__(self) -> str:
        import submitit

        import cli
        from ablations.provenance import record_start
        from dico.callbacks.preemption import PREEMPTED_EXIT_CODE

        env = submitit.JobEnvironment()
        os.chdir(ROOT)
        os.environ.update(wandb_env(self.row, self.out))
        run_dir = self.row.run_dir(self.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        if env.global_rank == 0:
            (run_dir / "failed.json").unlink(missing_ok=True)  # left by an earlier attempt of this row
            record_start(run_dir)
        config = resolve(self.row, self.out, self.extra)
        try:
            for stage in stages(self.row, self.out, self.extra):
                code = cli.main(stage)
                if code == PREEMPTED_EXIT_CODE:
                    return self._requeue_after_sigterm(env, run_dir, stage[0])
                if code not in (0, None):
                    raise RuntimeError(f"cli.py {stage[0]} failed (exit status {code})")
        except BaseException as e:
            if not (self._requeued and isinstance(e, SystemExit)):  # submitit's requeue exit is no failure
                record_failure(run_dir, stage="job", rank=env.global_rank, error=repr(e), log=_task_log(env))
            raise
        if env.global_rank == 0:
            finalize(self.row, self.out, config, self.args, self.extra)
        return str(run_dir)

    def _requeue_after_sigterm(self, env: Any, run_dir: Path, stage: str) -> str:
        """``last.ckpt`` is saved: rank 0 requeues the job as on submitit's own signal (its handler calls
        :meth:`checkpoint`, requeues and exits); the other tasks end, and are restarted with the job."""
        if env.global_rank == 0:
            try:
                os.kill(os.getpid(), env._usr_sig())  # submitit's checkpoint-and-requeue handler, with its job state
                time.sleep(5)  # the handler exits the process; this line is not reached when it does
            except Exception as e:  # requeue refused (e.g. the job was cancelled): resumable by a new submission
                record_failure(
                    run_dir,
                    stage=stage,
                    rank=0,
                    log=_task_log(env),
                    error=f"SIGTERM: last.ckpt saved, but the requeue failed ({e!r}); rerun `run.py` to "
                    f"resubmit: the row resumes from last.ckpt",
                )
                raise
        return f"{run_dir}: stopped by SIGTERM at a saved last.ckpt; requeued by rank 0"

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0 at timeout/preemption: the same row again (it resumes from ``last.ckpt``)."""
        import submitit

        self._requeued = True
        run_dir = self.row.run_dir(self.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "requeued.json"
        history = json.loads(log.read_text()) if log.exists() else []
        history.append(
            {
                "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""),
                "resumes_from_step": checkpoint_step(run_dir),
            }
        )
        atomic_write(log, json.dumps(history, indent=1))
        return submitit.helpers.DelayedSubmission(RowJob(self.row, self.out, self.args, self.extra))


def _task_log(env: Any) -> str:
    """This task's submitit log (``<out>/submitit/<jobid>/<jobid>_<rank>_log.out``; the debug executor has none)."""
    try:
        return str(env.paths.stdout)
    except KeyError:
        return "the console (submitit's debug executor)"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def record_failure(run_dir: Path, *, stage: str, rank: int, error: str, log: Path | str) -> None:
    """``failed.json``: a row that will not finish without a new submission, and where to read why."""
    atomic_write(run_dir / "failed.json", json.dumps({"stage": stage, "rank": rank, "error": error, "log": str(log)}))


def slurm_parameters(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """submitit ``AutoExecutor`` parameters from the row's composed config (after :func:`placement`): one task per
    device on each of ``trainer.num_nodes`` nodes, as Lightning's SLURM environment expects (one source of truth);
    CPUs per task from ``--cpus-per-task``, else the DataModule's ``num_workers`` + 1; ``--mem-gb``; extra sbatch
    options (``--slurm-param KEY=VALUE``) beside ``--requeue``; submitit's time-limit signal ``--signal-delay`` seconds
    ahead of the limit."""
    trainer, data = config["trainer"], config["data"].get("init_args") or {}
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, list):
        devices = len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise SystemExit(
            f"trainer.devices is {devices!r}: a SLURM job needs a device count per node; pass --gpus-per-node N "
            f"(the trainer and the job then both use N)"
        )
    gpus = devices if str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") else 0
    cpus = args.cpus_per_task or int(data.get("num_workers") or 0) + 1
    extra = {"requeue": True, **dict(args.slurm_param or [])}
    params: dict[str, Any] = {
        "nodes": int(nodes),
        "tasks_per_node": devices,
        "gpus_per_node": gpus,
        "cpus_per_task": cpus,
        "mem_gb": args.mem_gb,
        "timeout_min": args.time,
        "name": "dico-ablation",
    }
    if args.cluster in (None, "slurm"):
        slurm = {
            "slurm_partition": args.partition,
            "slurm_account": args.account,
            "slurm_signal_delay_s": args.signal_delay,
            "slurm_additional_parameters": extra,
        }
        params.update(slurm)
    return {k: v for k, v in params.items() if v is not None}


def slurm_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its dashes), got {text!r}")
    return key.lstrip("-"), (True if value == "" else value)


@contextlib.contextmanager
def submission_lock(run_dir: Path) -> Any:
    """Held while a row is checked and submitted: two invocations (e.g. Table 3 and Table 4) never submit it twice.
    Yields False when another process holds it."""
    import fcntl

    with open(run_dir / "submit.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _may_resubmit(row: Row, record: dict[str, Any], state: str, log: str, *, forget: bool) -> bool:
    """Whether the row may get a new job, its last one being in ``state``; says why not, or why the old one is
    dropped. ``forget``: drop a job unknown to sacct at once (never one sacct shows queued or running)."""
    job, hours = record["job_id"], GONE_AFTER_HOURS
    if state == "GONE":
        print(
            f"[ablations] {row.row} ({row.key}): job {job} unknown to sacct, no sign of life for over {hours} h: "
            f"counted as gone; submitted again",
            flush=True,
        )
        return True
    if state == "UNKNOWN" and forget:
        print(
            f"[ablations] {row.row} ({row.key}): job {job} unknown to sacct: forgotten (--forget); submitted again",
            flush=True,
        )
        return True
    if state not in ACTIVE_STATES:
        return True
    print(f"[ablations] {row.row} ({row.key}): job {job} is {state}; not resubmitted (log: {log})", flush=True)
    if state == "UNKNOWN":
        print(
            f"[ablations]   sacct does not know job {job}: if it is gone, rerun with --forget to submit the row "
            f"again (after {hours} h without a sign of life it counts as gone by itself)",
            flush=True,
        )
    elif forget:
        print(
            f"[ablations]   --forget leaves a {state} job alone: `scancel {job}` first to submit the row again",
            flush=True,
        )
    return False


def submit_slurm(rows: list[Row], out: Path, args: argparse.Namespace) -> list[Any]:
    """One submitit job per row, unless the row's job (``job.json``, any table, any invocation) is still queued or
    running: that one is reported, not resubmitted. Returns the new jobs."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster=args.cluster)
    jobs = []
    for row in rows:
        run_dir = row.run_dir(out)
        run_dir.mkdir(parents=True, exist_ok=True)
        with submission_lock(run_dir) as held:
            if not held:
                print(f"[ablations] {row.key}: being submitted by another invocation; skipped here", flush=True)
                continue
            last = row_job(run_dir)
            if last is not None and not _may_resubmit(row, *last, forget=args.forget):
                continue
            config = resolve(row, out, args.extra)
            where = placement(config, args.nodes, args.gpus_per_node)
            if where:
                config = resolve(row, out, [*args.extra, *where])
            executor.update_parameters(**slurm_parameters(config, args))
            for stale in ("failed.json", "requeued.json"):
                (run_dir / stale).unlink(missing_ok=True)
            job = executor.submit(RowJob(row, out, args, [*args.extra, *where]))
            record = {
                "job_id": job.job_id,
                "cluster": executor.cluster,
                "folder": str(out / "submitit" / "%j"),
                "host": socket.gethostname(),
                "submitted": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "table": row.table,
                "row": row.row,
                "log": str(job.paths.stdout),
            }
            atomic_write(run_dir / "job.json", json.dumps(record, indent=1))
            print(f"[ablations] {row.key}: job {job.job_id}\n[ablations]   log: {job.paths.stdout}", flush=True)
            jobs.append(job)
    if executor.cluster == "debug":  # submitit's debug executor runs a job when its result is asked for, here
        for job in jobs:
            job.result()
    return jobs
