"""Run the paper's ablation Tables 3 and 4: every row a LightningCLI config, launched locally or on SLURM.

    python ablations/run.py --table 4 --budget proxy                     # every row on the embedded digits, CPU
    python ablations/run.py --table 4 --budget structure                 # counts + throughput ratios, no training
    python ablations/run.py --table 3 --budget paper --launcher slurm --nodes 1 --gpus-per-node 8 \\
        --partition gpu --time 4320 --account ACC                        # one SLURM job per row (submitit)
    python ablations/run.py status --table 4 --budget proxy              # pending / running / finished / failed
    python ablations/run.py collect --table 4 --budget proxy             # rebuild the tables from finished rows

A row is ``python cli.py fit -c experiments/base.yaml -c ablations/configs/table<T>.yaml -c
ablations/configs/budgets/<budget>.yaml -c ablations/configs/rows/[digits/]<model>.yaml`` (``--dry-run`` prints
each row's exact commands), then ``python cli.py test`` of the same configs on its ``last.ckpt`` for the FID.
This runner only composes those configs, launches them and reads back what they wrote: trainer, loggers and
callbacks are the configs'. Runs are keyed by budget, model and seed (``<out>/<budget>/<model>/seed<k>``), so a
model in both tables trains once; a finished run (``result.json``) is skipped, an interrupted one resumes from
its ``last.ckpt``. After training, rank 0 alone counts the row and times it against DiCo-S in interleaved turns
(:mod:`ablations.measure`) and writes ``result.json``; the tables (``ablations/results/table<T>-<budget>.*``) are
rebuilt from every finished run of the table, so runs in parallel invocations do not clobber each other.
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
    """Compute the FID reference statistics (and, for the digits FID, train its classifier) once, before rows that
    would each compute them at the same time are launched: ``python cli.py reference`` with the config's settings."""
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
    """The FIDEvaluation callback's settings of a composed config (empty without one)."""
    return next((cb.get("init_args") or {} for cb in config["trainer"].get("callbacks") or []
                 if cb["class_path"].endswith("FIDEvaluation")), {})  # fmt: skip


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
    if config["trainer"]["max_steps"] != 0:
        record = score_record(run_dir, config)
        steps = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=True)["global_step"]
        result.update(
            metrics=record["metrics"],
            eval=record["settings"],
            steps=steps,
            eval_samples=record["settings"]["num_samples"],
            feature_extractor=record["feature_extractor"],
        )
        result["wandb"] = wandb_link(run_dir)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(run_dir / "result.json")  # atomic: a row is finished exactly when result.json exists
    return result


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
    run_dir = row.run_dir(out)
    (run_dir / "failed.json").unlink(missing_ok=True)
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
    makes them one DDP group over all GPUs and nodes); rank 0 then finalizes. Preempted or timed out, the job
    requeues itself and resumes from ``last.ckpt``."""

    def __init__(self, row: Row, out: Path, args: argparse.Namespace, extra: list[str]) -> None:
        self.row, self.out, self.args, self.extra = row, out, args, extra

    def __call__(self) -> str:
        import submitit

        import cli

        os.chdir(ROOT)
        os.environ.update(wandb_env(self.row, self.out))
        run_dir = self.row.run_dir(self.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = resolve(self.row, self.out, self.extra)
        try:
            for stage in stages(self.row, self.out, self.extra, config):
                if cli.main(stage) not in (0, None):
                    raise RuntimeError(f"cli.py {stage[0]} failed")
        except BaseException:
            (run_dir / "failed.json").write_text(json.dumps({"stage": "job", "log": str(run_dir / "slurm")}))
            raise
        if submitit.JobEnvironment().global_rank == 0:
            finalize(self.row, self.out, config, self.args, self.extra)
        return str(run_dir)

    def checkpoint(self) -> Any:
        """Called by submitit on timeout/preemption: requeue the same job (it resumes from ``last.ckpt``)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RowJob(self.row, self.out, self.args, self.extra))


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """submitit ``AutoExecutor`` parameters: one task per GPU on every node (Lightning's SLURM environment)."""
    gpus = args.gpus_per_node or 1
    params: dict[str, Any] = {"nodes": args.nodes or 1, "tasks_per_node": gpus, "timeout_min": args.time,
                              "name": "dico-ablation"}  # fmt: skip
    if args.cluster in (None, "slurm"):
        slurm = {"gpus_per_node": gpus, "slurm_partition": args.partition, "slurm_account": args.account,
                 "slurm_additional_parameters": {"requeue": True}}  # fmt: skip
        params.update({k: v for k, v in slurm.items() if v is not None})
    return params


def submit_slurm(rows: list[Row], out: Path, args: argparse.Namespace) -> list[Any]:
    """One submitit job per row; returns the jobs (``job.job_id``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster=args.cluster)
    executor.update_parameters(**slurm_parameters(args))
    jobs = []
    with executor.batch():
        for row in rows:
            config = resolve(row, out, args.extra)
            extra = [*args.extra, *placement(config, args.nodes, args.gpus_per_node)]
            row.run_dir(out).mkdir(parents=True, exist_ok=True)
            (row.run_dir(out) / "failed.json").unlink(missing_ok=True)
            jobs.append(executor.submit(RowJob(row, out, args, extra)))
    for row, job in zip(rows, jobs, strict=True):
        (row.run_dir(out) / "job.json").write_text(json.dumps({"job_id": job.job_id, "submitted": time.time()}))
        print(f"[ablations] {row.key}: job {job.job_id}", flush=True)
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


def row_status(row: Row, out: Path) -> str:
    run_dir = row.run_dir(out)
    if (run_dir / "result.json").exists():
        result = json.loads((run_dir / "result.json").read_text())
        metrics = result.get("metrics") or {}
        fid, heldout = metrics.get("frechet_inception_distance"), metrics.get("heldout_mse")
        if fid is not None:
            return f"finished (FID {fid:.2f})"
        return f"finished (held-out MSE {heldout:.5f})" if heldout is not None else "finished (counted)"
    if (run_dir / "failed.json").exists():
        return f"failed (log: {json.loads((run_dir / 'failed.json').read_text())['log']})"
    job = json.loads((run_dir / "job.json").read_text())["job_id"] if (run_dir / "job.json").exists() else None
    done = progress(run_dir)
    if (run_dir / "running.json").exists():
        holder = json.loads((run_dir / "running.json").read_text() or "{}")
        where = f"pid {holder.get('pid')} on {holder.get('host')}"
        return f"running ({where}" + (f", step {done[0]}, loss {done[1]:.4f})" if done else ")")
    if done is not None:
        return f"running or interrupted (step {done[0]}, loss {done[1]:.4f})" + (f", job {job}" if job else "")
    return "pending" + (f" (job {job})" if job else "")


def finished_results(table: str, budget: str, out: Path) -> list[dict[str, Any]]:
    """Every finished run of the table's models at this budget (all seeds), wherever it was launched from."""
    models = {canonical(r.model) for r in rows_of(table, budget)}
    results = []
    for path in sorted((out / budget).glob("*/seed*/result.json")):
        result = json.loads(path.read_text())
        if canonical(result["model"]) in models:
            results.append(result)
    return results


def collect(table: str, budget: str, out: Path, results_dir: Path, command: str) -> list[Path]:
    from ablations.report import write_report

    results = finished_results(table, budget, out)
    paths = write_report(table, budget, results, results_dir, command)
    print("[ablations] wrote " + ", ".join(str(p) for p in paths), flush=True)
    return paths


# --------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "status", "collect") else "run"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES), required=True)
    p.add_argument("--budget", choices=BUDGETS, default="structure")
    p.add_argument("--rows", nargs="+", help="paper row names (default: every row of the table)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (seed_everything) of every row")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folders: <out>/<budget>/<model>/seed<k>")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="tables and plots")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--devices", type=int, help="local: devices per row (the global batch is kept)")
    p.add_argument("--nodes", type=int, help="slurm: nodes per row")
    p.add_argument("--gpus-per-node", type=int, help="slurm: GPUs (= tasks) per node")
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
    p.add_argument("--dry-run", action="store_true", help="print each row's commands and exit")
    p.add_argument("extra", nargs="*", help="after --: more cli.py options for every row, e.g. -- --trainer.precision "
                   "bf16-mixed")  # fmt: skip
    args = p.parse_args(argv)
    args.command = command
    if args.launcher == "local" and (args.nodes or args.gpus_per_node):
        p.error("--nodes/--gpus-per-node are for --launcher slurm; locally use --devices")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out.resolve()
    rows = rows_of(args.table, args.budget, args.rows, args.seeds)
    command = "python ablations/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    args.command_line = command
    if args.command == "status":
        for row in rows:
            print(f"{row.row:<26} {row.key:<40} {row_status(row, out)}")
        return 0
    if args.command == "collect":
        collect(args.table, args.budget, out, args.results, command)
        return 0
    if args.dry_run:
        print("\n".join(stage_lines(rows, out, args.extra)))
        return 0
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
    collect(args.table, args.budget, out, args.results, command)
    if failed:
        print(f"[ablations] failed: {[r.key for r in failed]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
