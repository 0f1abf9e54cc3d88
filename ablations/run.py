"""Run the paper's ablation Tables 3 and 4: every row a LightningCLI config, launched locally or on SLURM.

    python ablations/run.py --table 4 --budget proxy                     # every row on the embedded digits, CPU
    python ablations/run.py --table 4 --budget structure                 # counts + throughput ratios, no training
    python ablations/run.py --table 3 --budget paper --launcher slurm --out /scratch/$USER/dico-ablations \\
        --partition gpu --time 4320 --account ACC --mem-gb 200          # one SLURM job per row (submitit)
    python ablations/run.py status --table 4 --budget proxy              # pending / requeued / running / failed
    python ablations/run.py collect --table 4 --budget proxy --seeds 0 1 # rebuild the tables from finished rows
    python ablations/run.py patch-fid --table 4 --budget crops16         # add crops16's patch FID to finished rows

A row is ``python cli.py fit -c experiments/base.yaml -c ablations/configs/table<T>.yaml -c
ablations/configs/budgets/<budget>.yaml -c ablations/configs/rows/[digits/]<model>.yaml`` (``--dry-run`` prints
each row's exact commands), then ``python cli.py test`` of the same configs on its ``last.ckpt`` for the FID.
This runner only composes those configs, launches them and reads back what they wrote: trainer, loggers and
callbacks are the configs'. Runs are keyed by budget, model and seed (``<out>/<budget>/<model>/seed<k>``), so a
model in both tables trains once; a finished run (``result.json``) is skipped, an interrupted one resumes from
its ``last.ckpt``. After training, rank 0 alone counts the row and times it against DiCo-S in interleaved turns
(:mod:`ablations.measure`) and writes ``result.json`` with its provenance (:mod:`ablations.provenance`); the
tables (``ablations/results/table<T>-<budget>.*``) are rebuilt from the finished runs of the table made by the
configs as they are now, so runs in parallel invocations do not clobber each other.

On SLURM (:class:`RowJob`, submitit) a row is submitted once: its ``job.json`` names the job, and a row whose job
is still queued or running (asked through submitit's job object, i.e. ``sacct``) is reported, not resubmitted, from
any table or invocation. Nodes x GPUs x tasks are the composed trainer's (``--nodes``/``--gpus-per-node`` set both),
CPUs per task default to ``data.num_workers + 1``. Timeouts and preemption requeue and resume from ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dico.runtime import configure_cpu_threads  # noqa: E402

# before torch loads (ablations.rows imports it): rank 0 times every row in this process, and with spinning OpenMP
# workers on a shared 2-core machine one crops16 row's throughput turns took 4 minutes instead of seconds
configure_cpu_threads()
from ablations.patch_fid import PATCH_FID, score_finished  # noqa: E402
from ablations.rows import BUDGETS, TABLES, Row, canonical, rows_of  # noqa: E402

DEFAULT_OUT = ROOT / "ablations" / "runs"
DEFAULT_RESULTS = ROOT / "ablations" / "results"
REFERENCE_MODEL = "DiCo-S"  # both tables' throughput reference
#: (forward batch, interleaved turns) of the throughput ratio per budget (the paper: batch 64 on an A100)
THROUGHPUT = {
    "structure": (64, 10),
    "smoke": (4, 2),
    "proxy": (64, 20),
    "crops16": (64, 10),
    "short": (64, 20),
    "paper": (64, 20),
}


# ------------------------------------------------------------------------------------------------- configs
def resolve(row: Row, out: Path, extra: list[str]) -> dict[str, Any]:
    """The row's composed config as ``python cli.py fit ... --print_config`` prints it (interpolations resolved)."""
    import yaml

    import cli

    buf, argv, cwd = io.StringIO(), sys.argv, Path.cwd()
    sys.argv = [str(ROOT / "cli.py")]  # LightningCLI warns when given both args and a command line
    os.chdir(ROOT)  # the configs' relative paths are relative to the checkout, where the rows run
    try:
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            cli.main(["fit", *row.cli_args(out, extra), "--print_config"])
    finally:
        sys.argv = argv
        os.chdir(cwd)
    config = yaml.safe_load(buf.getvalue())
    if not isinstance(config, dict) or "model" not in config:
        raise SystemExit(f"could not compose the config of {row.model}: {buf.getvalue()[-2000:]}")
    return config


def placement(config: dict[str, Any], nodes: int | None, devices: int | None) -> list[str]:
    """Options moving the row onto ``nodes`` x ``devices`` with its global batch unchanged; an error if it does not
    divide (the global batch is part of the recipe, never floored)."""
    if nodes is None and devices is None:
        return []
    t, per_device = config["trainer"], config["data"]["init_args"]["batch_size"]
    accumulate = t.get("accumulate_grad_batches") or 1
    global_batch = t["num_nodes"] * t["devices"] * per_device * accumulate
    nodes, devices = nodes or t["num_nodes"], devices or t["devices"]
    share, rest = divmod(global_batch, nodes * devices * accumulate)
    if rest or share == 0:
        raise SystemExit(
            f"the global batch {global_batch} does not divide over {nodes} node(s) x {devices} device(s) x "
            f"{accumulate} accumulation step(s); choose a device count that divides it, or set "
            f"--trainer.accumulate_grad_batches so that nodes x devices x per-device batch x accumulation = "
            f"{global_batch}"
        )
    return ["--trainer.num_nodes", str(nodes), "--trainer.devices", str(devices),
            "--data.init_args.batch_size", str(share)]  # fmt: skip


def prepare_reference(config: dict[str, Any]) -> None:
    """Compute the FID reference statistics (and, for the digits FID, place its committed classifier) once, before
    rows that would each compute them at the same time are launched: ``python cli.py reference`` with the config's
    settings."""
    fid = fid_settings(config)
    if not fid.get("reference_source") or (ROOT / fid["reference"]).exists():
        return
    command = [sys.executable, str(ROOT / "cli.py"), "reference", "--source", fid["reference_source"], "--out",
               fid["reference"], "--feature_extractor", fid["feature_extractor"], "--device", "cpu"]  # fmt: skip
    if fid.get("weights_path"):
        command += ["--weights_path", fid["weights_path"]]
    if fid.get("reference_image_size"):
        command += ["--image_size", str(fid["reference_image_size"])]
    print(f"[ablations] FID reference: python {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


# --------------------------------------------------------------------------------------------- one row
def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def wandb_env(row: Row, out: Path) -> dict[str, str]:
    """One wandb run per row across fit, test and requeues: a fixed run id resumed by each stage."""
    digest = hashlib.sha1(str(row.run_dir(out).resolve()).encode()).hexdigest()[:8]
    return {"WANDB_RUN_ID": f"{row.key.replace('/', '-')}-{digest}", "WANDB_RESUME": "allow"}


def fid_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The FIDEvaluation callback's settings of a composed config (empty without one, or when it is off)."""
    from dico.callbacks.settings import active_callbacks

    disabled = (config.get("callback_settings") or {}).get("disabled") or []
    callbacks = active_callbacks(config["trainer"].get("callbacks") or [], disabled)
    return next((cb.get("init_args") or {} for cb in callbacks if cb["class_path"].endswith("FIDEvaluation")), {})


def stages(row: Row, out: Path, extra: list[str], config: dict[str, Any]) -> list[list[str]]:
    """The ``cli.py`` argument lists of a row: fit (resuming when a ``last.ckpt`` exists), then test when the budget
    scores with the test protocol (``test_num_samples`` > 0; else its final periodic FID is the score)."""
    if config["trainer"]["max_steps"] == 0:
        return []
    last = last_checkpoint(row.run_dir(out))
    resume = ["--ckpt_path", str(last)] if last.exists() else []
    fit = ["fit", *row.cli_args(out, extra), *resume]
    if fid_settings(config).get("test_num_samples", 0) > 0:
        return [fit, ["test", *row.cli_args(out, extra), "--ckpt_path", str(last)]]
    return [fit]


def score_record(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The row's evaluation record: the test protocol's, or the final periodic one (``eval/step_<max_steps>``);
    with the held-out loss (``HeldOutLoss``) of the last step in its metrics, or alone without an FID."""
    step = config["trainer"]["max_steps"]
    heldout = run_dir / "eval" / f"heldout_step_{step:07d}.json"
    if not fid_settings(config):
        return json.loads(heldout.read_text())
    if fid_settings(config).get("test_num_samples", 0) > 0:
        record = json.loads((run_dir / "test" / "record.json").read_text())
    else:
        record = json.loads((run_dir / "eval" / f"step_{step:07d}.json").read_text())
    if heldout.exists():
        record["metrics"].update(json.loads(heldout.read_text())["metrics"])
    return record


def stage_lines(rows: list[Row], out: Path, extra: list[str]) -> list[str]:
    """Each row's commands (``--dry-run``)."""
    return [
        f"python cli.py {' '.join(stage)}"
        for row in rows
        for stage in stages(row, out, extra, resolve(row, out, extra))
    ]


def finalize(row: Row, out: Path, config: dict[str, Any], args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Rank 0, after training: counts, the interleaved throughput ratio, the test record -> ``result.json``."""
    import torch
    import yaml

    from ablations.measure import counts, machine, throughput_ratio
    from ablations.provenance import provenance
    from dico.models.ablation import VARIANTS

    run_dir = row.run_dir(out)
    model, kwargs = config["model"]["model"], dict(config["model"].get("model_kwargs") or {})
    # the reference (DiCo-S) at the row's size: its own overlay for this budget
    reference_overlay = Row(row.table, "DiCo-S", REFERENCE_MODEL, row.budget).overlay()
    reference_kwargs = yaml.safe_load(reference_overlay.read_text())["model"].get("model_kwargs") or {}
    batch = args.throughput_batch or THROUGHPUT[row.budget][0]
    turns = args.throughput_turns or THROUGHPUT[row.budget][1]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entry = row.entry
    result: dict[str, Any] = {
        "table": row.table, "row": row.row, "model": model, "budget": row.budget, "seed": row.seed,
        "model_kwargs": kwargs, "note": entry.note, "shape": VARIANTS[model].shape,
        "deviation": entry.deviation, "paper": entry.paper, "run_dir": str(run_dir),
        "command": "python cli.py fit " + " ".join(row.cli_args(out, extra)),
        "full_size": counts(model, {}), "trained_size": counts(model, kwargs),
        "reference_size": counts(REFERENCE_MODEL, reference_kwargs),
        "launched_by": getattr(args, "command_line", ""), "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    result.update(throughput_ratio(model, kwargs, REFERENCE_MODEL, reference_kwargs, batch=batch, turns=turns,
                                   device=device, sdpa=args.sdpa_kernel, seed=row.seed))  # fmt: skip
    record = None
    if config["trainer"]["max_steps"] != 0:
        record = score_record(run_dir, config)
        steps = checkpoint_step(run_dir)
        result.update(
            metrics=record["metrics"],
            eval=record["settings"],
            steps=steps,
            eval_samples=record["settings"]["num_samples"],
            feature_extractor=record["feature_extractor"],
        )
        result["wandb"] = wandb_link(run_dir)
        result["test_samples"] = drop_test_samples(run_dir, keep=getattr(args, "keep_test_samples", False))
    result["provenance"] = provenance(row, run_dir, getattr(args, "overrides", []), record)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(run_dir / "result.json")  # atomic: a row is finished exactly when result.json exists
    return result


def drop_test_samples(run_dir: Path, keep: bool) -> str:
    """The test stage's samples (``test/samples.npz``: 50,000 images at the paper budget) once the row is scored:
    removed unless ``keep`` (``--keep-test-samples``); what was done, for ``result.json``."""
    samples = run_dir / "test" / "samples.npz"
    if not samples.exists():
        return "not saved"
    if keep:
        return str(samples)
    size = samples.stat().st_size
    samples.unlink()
    return f"removed after scoring ({size / 1e9:.2f} GB; --keep-test-samples keeps them)"


def wandb_link(run_dir: Path) -> str:
    """The row's wandb run: its URL when online, else the ``wandb sync`` line of its offline folder."""
    runs = sorted((run_dir / "wandb").glob("*run-*"))
    if not runs:
        return ""
    latest = runs[-1]
    if latest.name.startswith("offline-run-"):
        return f"wandb sync {latest}"
    meta = latest / "files" / "wandb-metadata.json"
    return json.loads(meta.read_text()).get("url", str(latest)) if meta.exists() else str(latest)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the training process gets SIGTERM (and checkpoints) when the runner is killed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def claim(run_dir: Path) -> bool:
    """Take the row for this process (``running.json``: host and pid), unless a live process already has it: two
    invocations sharing a row (DiCo-S is in both tables) never train it at once."""
    lock = run_dir / "running.json"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = json.loads(lock.read_text() or "{}")
            if holder.get("host") == me["host"] and _alive(holder.get("pid", -1)) and holder["pid"] != me["pid"]:
                return False
            lock.unlink(missing_ok=True)  # left by a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    return True


def run_local(row: Row, out: Path, args: argparse.Namespace) -> bool:
    """Train, score and finalize one row in subprocesses of ``cli.py``; True when it finished (or another live
    invocation is training it)."""
    run_dir = row.run_dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not claim(run_dir):
        print(f"[ablations] {row.key}: being trained by another invocation; skipped here", flush=True)
        return True
    try:
        return _run_claimed(row, out, args)
    finally:
        (run_dir / "running.json").unlink(missing_ok=True)


def _run_claimed(row: Row, out: Path, args: argparse.Namespace) -> bool:
    from ablations.provenance import record_start

    run_dir = row.run_dir(out)
    (run_dir / "failed.json").unlink(missing_ok=True)
    record_start(run_dir)
    config = resolve(row, out, args.extra)
    log = run_dir / "run.log"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **wandb_env(row, out), "PYTHONPATH": path}
    for stage in stages(row, out, args.extra, config):
        print(f"[ablations] {row.key}: python cli.py {' '.join(stage)}", flush=True)
        with open(log, "a") as f:
            f.write(f"\n$ python cli.py {' '.join(stage)}\n")
            f.flush()
            code = subprocess.call([sys.executable, str(ROOT / "cli.py"), *stage], cwd=ROOT, env=env, stdout=f,
                                   stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # fmt: skip
        if code != 0:
            (run_dir / "failed.json").write_text(json.dumps({"stage": stage[0], "returncode": code, "log": str(log)}))
            print(f"[ablations] {row.key}: {stage[0]} failed ({code}); see {log}", flush=True)
            return False
    finalize(row, out, config, args, args.extra)
    return True


class RowJob:
    """A SLURM job (submitit) training one row: every task runs fit and test (Lightning's SLURM environment
    makes them one DDP group over all GPUs and nodes); rank 0 then finalizes.

    Stopped early, the job requeues through submitit and resumes from ``last.ckpt``; neither is a failure:

    - time limit or preemption signal (submitit's ``USR2``, ``signal_delay_s`` before the limit): submitit calls
      :meth:`checkpoint` on rank 0, which returns the same row as a :class:`submitit.helpers.DelayedSubmission`, and
      requeues the job (``scontrol requeue``; the local executor restarts it). The requeued job resumes from the
      latest periodic ``last.ckpt`` (the ``ModelCheckpoint``'s ``every_n_train_steps``).
    - SIGTERM (preemption without the signal, ``scancel --signal TERM``): Lightning finishes the step,
      :class:`dico.callbacks.PreemptionCheckpoint` saves ``last.ckpt`` there and ``cli.py`` exits with status 75;
      rank 0 then takes submitit's own checkpoint-and-requeue path.

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
            for stage in stages(self.row, self.out, self.extra, config):
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
                record_failure(run_dir, stage=stage, rank=0, log=_task_log(env),
                               error=f"SIGTERM: last.ckpt saved, but the requeue failed ({e!r}); rerun `run.py` to "
                               f"resubmit: the row resumes from last.ckpt")  # fmt: skip
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
        history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""),
                        "resumes_from_step": checkpoint_step(run_dir)})  # fmt: skip
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


def checkpoint_step(run_dir: Path) -> int | None:
    """The global step of the row's ``last.ckpt`` (None without one)."""
    from dico.checkpoints import read_checkpoint

    path = last_checkpoint(run_dir)
    if not path.exists():
        return None
    return int(read_checkpoint(path)["global_step"])


def slurm_parameters(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """submitit ``AutoExecutor`` parameters from the row's composed config (after :func:`placement`): one task per
    device on each of ``trainer.num_nodes`` nodes, as Lightning's SLURM environment expects (one source of truth);
    CPUs per task from ``--cpus-per-task``, else the DataModule's ``num_workers`` + 1; ``--mem-gb``; extra sbatch
    options (``--slurm-param KEY=VALUE``) beside ``--requeue``."""
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
    params: dict[str, Any] = {"nodes": int(nodes), "tasks_per_node": devices, "gpus_per_node": gpus,
                              "cpus_per_task": cpus, "mem_gb": args.mem_gb, "timeout_min": args.time,
                              "name": "dico-ablation"}  # fmt: skip
    if args.cluster in (None, "slurm"):
        slurm = {"slurm_partition": args.partition, "slurm_account": args.account,
                 "slurm_additional_parameters": extra}  # fmt: skip
        params.update(slurm)
    return {k: v for k, v in params.items() if v is not None}


def _slurm_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an sbatch option without its dashes), got {text!r}")
    return key.lstrip("-"), (True if value == "" else value)


#: submitit job states (sacct's, or the local executor's) of a job that is still queued or running; PREEMPTED as
#: the last state is not among them (a requeued job is PENDING or REQUEUED again)
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "READY", "UNKNOWN")  # fmt: skip


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
            state = "RUNNING" if same_host and _alive(int(job_id)) else "ENDED WITHOUT A RESULT"
        return state, log
    return "ENDED", log  # the debug executor runs its jobs inside the submitting process


def active_job(run_dir: Path) -> tuple[dict[str, Any], str, str] | None:
    """(job record, state, log) of the row's job if it is still queued or running, else None."""
    record = job_record(run_dir)
    if record is None:
        return None
    state, log = job_state(record)
    return (record, state, log) if state in ACTIVE_STATES else None


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
            active = active_job(run_dir)
            if active is not None:
                record, state, log = active
                print(f"[ablations] {row.row} ({row.key}): job {record['job_id']} is {state}; not resubmitted "
                      f"(log: {log})", flush=True)  # fmt: skip
                if state == "UNKNOWN":
                    print(f"[ablations]   sacct does not know job {record['job_id']}: if it is gone, remove "
                          f"{run_dir / 'job.json'} to submit the row again", flush=True)  # fmt: skip
                continue
            config = resolve(row, out, args.extra)
            where = placement(config, args.nodes, args.gpus_per_node)
            if where:
                config = resolve(row, out, [*args.extra, *where])
            executor.update_parameters(**slurm_parameters(config, args))
            for stale in ("failed.json", "requeued.json"):
                (run_dir / stale).unlink(missing_ok=True)
            job = executor.submit(RowJob(row, out, args, [*args.extra, *where]))
            record = {"job_id": job.job_id, "cluster": executor.cluster, "folder": str(out / "submitit" / "%j"),
                      "host": socket.gethostname(), "submitted": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      "table": row.table, "row": row.row, "log": str(job.paths.stdout)}  # fmt: skip
            atomic_write(run_dir / "job.json", json.dumps(record, indent=1))
            print(f"[ablations] {row.key}: job {job.job_id}\n[ablations]   log: {job.paths.stdout}", flush=True)
            jobs.append(job)
    if executor.cluster == "debug":  # submitit's debug executor runs a job when its result is asked for, here
        for job in jobs:
            job.result()
    return jobs


# ------------------------------------------------------------------------------------------ status/collect
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


# --------------------------------------------------------------------------------------------------- main
#: budgets whose run folders are large (checkpoints of full-size models, kept milestones): ~15 GB a row at `paper`
LARGE_BUDGETS = ("short", "paper")


def warn_if_inside_checkout(out: Path, args: argparse.Namespace) -> None:
    """A loud note when full-size rows would write their run folders inside the checkout."""
    if args.budget in LARGE_BUDGETS and out.resolve().is_relative_to(ROOT):
        bar = "!" * 100
        print(f"{bar}\n[ablations] the run folders go to {out}, INSIDE the checkout: at the {args.budget} budget a row "
              f"writes its checkpoints there (several GB a row, ~15 GB at the paper budget with its milestones).\n"
              f"[ablations] pass --out on a scratch file system, e.g. --out /scratch/$USER/dico-ablations\n{bar}",
              file=sys.stderr, flush=True)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "status", "collect", "patch-fid") else "run"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES), required=True)
    p.add_argument("--budget", choices=BUDGETS, default="structure")
    p.add_argument("--rows", nargs="+", help="paper row names (default: every row of the table)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (seed_everything) of every row (default: 0; collect: "
                   "every seed found)")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folders: <out>/<budget>/<model>/seed<k>")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="tables and plots")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--devices", type=int, help="local: devices per row (the global batch is kept)")
    p.add_argument("--nodes", type=int, help="slurm: nodes per row (default: the config's trainer.num_nodes; the "
                   "trainer is set to match)")  # fmt: skip
    p.add_argument("--gpus-per-node", type=int, help="slurm: GPUs (= tasks) per node (default: the config's "
                   "trainer.devices; the trainer is set to match)")  # fmt: skip
    p.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per task (default: data.num_workers + 1)")
    p.add_argument("--mem-gb", type=float, help="slurm: memory per node in GB (default: the partition's)")
    p.add_argument("--slurm-param", action="append", type=_slurm_param, metavar="KEY=VALUE",
                   help="slurm: one more sbatch option, e.g. --slurm-param qos=high --slurm-param constraint=a100 "
                   "(submitit's slurm_additional_parameters; repeatable)")  # fmt: skip
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time", type=int, default=4320, help="slurm time limit per job (minutes); jobs requeue")
    p.add_argument("--account", help="slurm account")
    p.add_argument("--cluster", help="submitit cluster (default: auto; 'local' or 'debug' run the jobs here)")
    p.add_argument("--device", help="device of the throughput measurement (default: cuda if available)")
    p.add_argument("--throughput-batch", type=int, help="forward batch of the throughput ratio")
    p.add_argument("--throughput-turns", type=int, help="interleaved turns of the throughput ratio")
    p.add_argument(
        "--sdpa-kernel",
        choices=["math", "flash", "efficient", "cudnn"],
        default="math",
        help="attention kernel pinned while timing (the paper's attention rows: no FlashAttention)",
    )
    p.add_argument(
        "--keep-test-samples",
        action="store_true",
        help="keep the test stage's samples "
        "(<run>/test/samples.npz: 50,000 images at the paper budget); removed once scored by default",
    )
    p.add_argument("--dry-run", action="store_true", help="print each row's commands and exit")
    p.add_argument("extra", nargs="*", help="after --: more cli.py options for every row, e.g. -- --trainer.precision "
                   "bf16-mixed")  # fmt: skip
    args = p.parse_args(argv)
    args.command = command
    args.overrides = list(args.extra)  # the user's cli.py options (placement options are added to extra later)
    slurm_only = ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "slurm_param")
    if args.launcher == "local" and any(getattr(args, name) for name in slurm_only):
        p.error("--nodes/--gpus-per-node/--cpus-per-task/--mem-gb/--slurm-param are for --launcher slurm; locally "
                "use --devices")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out.resolve()
    rows = rows_of(args.table, args.budget, args.rows, args.seeds or [0])
    command = "python ablations/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    args.command_line = command
    if args.command == "status":
        for row in rows:
            print(f"{row.row:<26} {row.key:<40} {row_status(row, out)}")
        return 0
    if args.command == "collect":
        collect(args.table, args.budget, out, args.results, command, args.seeds, args.overrides)
        return 0
    if args.command == "patch-fid":
        if args.budget not in PATCH_FID:
            raise SystemExit(f"the patch FID is a score of the {', '.join(PATCH_FID)} budget(s), not of {args.budget}")
        models = {r.run_dir(out).parent for r in rows}
        dirs = [r.run_dir(out) for r in rows] if args.seeds else sorted(d for m in models for d in m.glob("seed*"))
        unscored = score_finished(dirs, resolve(rows[0], out, args.extra), out, args.budget)
        collect(args.table, args.budget, out, args.results, command, args.seeds, args.overrides)
        return 1 if unscored else 0
    if args.dry_run:
        print("\n".join(stage_lines(rows, out, args.extra)))
        return 0
    warn_if_inside_checkout(out, args)
    todo = []
    for row in dict.fromkeys(rows):  # rows are unique by (budget, model, seed)
        if (row.run_dir(out) / "result.json").exists():
            print(f"[ablations] {row.row} ({row.key}): finished earlier", flush=True)
        else:
            todo.append(row)
    if todo:
        prepare_reference(resolve(todo[0], out, args.extra))
    if args.launcher == "slurm":
        submit_slurm(todo, out, args)
        print("[ablations] follow with `python ablations/run.py status ...`; tables: `... collect ...`")
        return 0
    if args.devices and todo:
        args.extra = [*args.extra, *placement(resolve(todo[0], out, args.extra), None, args.devices)]
    failed = [row for row in todo if not run_local(row, out, args)]
    if args.budget in PATCH_FID:  # the budget's second score, from the finished rows' checkpoints
        unscored = score_finished([r.run_dir(out) for r in dict.fromkeys(rows)], resolve(rows[0], out, args.extra),
                                  out, args.budget)  # fmt: skip
        failed += [row for row in rows if row.run_dir(out) in unscored]
    collect(args.table, args.budget, out, args.results, command, None, args.overrides)
    if failed:
        print(f"[ablations] failed: {[r.key for r in failed]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
