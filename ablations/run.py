"""Run the paper's ablation Tables 3 and 4: every row a LightningCLI config, launched locally or on SLURM.

    python ablations/run.py --table 4 --budget proxy                     # every row on the embedded digits, CPU
    python ablations/run.py --table 4 --budget structure                 # counts + throughput ratios, no training
    python ablations/run.py --table 3 --budget paper --launcher slurm --out /scratch/$USER/dico-ablations \\
        --partition gpu --time 4320 --account ACC --mem-gb 200          # one SLURM job per row (submitit)
    python ablations/run.py status --table 4 --budget proxy              # not submitted / queued / running / ...
    python ablations/run.py --table 4 --budget paper --launcher slurm --rows DiCo-S --forget  # resubmit a lost job
    python ablations/run.py collect --table 4 --budget proxy --seeds 0 1 # rebuild the tables from finished rows
    python ablations/run.py patch-fid --table 4 --budget crops16         # add crops16's patch FID to finished rows
    python ablations/run.py restat --table 4 --budget proxy --results ablations/results  # an older runner's table

A row is ``python cli.py fit -c experiments/base.yaml -c ablations/configs/table<T>.yaml -c
ablations/configs/budgets/<budget>.yaml -c ablations/configs/rows/[digits/]<model>.yaml`` (``--dry-run`` prints
each row's exact commands), then, at a budget scored by the test protocol, ``python cli.py test`` of the same
configs on its ``last.ckpt``.
This runner only composes those configs, launches them and reads back what they wrote: trainer, loggers and
callbacks are the configs'. Runs are keyed by budget, model and seed (``<out>/<budget>/<model>/seed<k>``), so a
model in both tables trains once; a finished run (``result.json``) is skipped, an interrupted one resumes from
its ``last.ckpt``. After training, rank 0 alone counts the row and times it against DiCo-S in interleaved turns
(:mod:`ablations.measure`) and writes ``result.json`` with its provenance (:mod:`ablations.provenance`) and the
scores it recorded along the way (:mod:`ablations.curves`); the tables (``<out>/results/table<T>-<budget>.*``, or
``--results``: the committed ones are ``--results ablations/results``) are rebuilt from the finished runs of the
table made by the configs as they are now, so runs in parallel invocations do not clobber each other; with scores
at several steps, each contrast also as a curve over the steps (``curves-table<T>-<budget>*``).

On SLURM (:class:`ablations.slurm.RowJob`, submitit) a row is submitted once and requeues on a time limit or
preemption, resuming from ``last.ckpt``.

The runner is one module per job (the list: ``docs/architecture.md``); this file is the command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from ablations.budgets import BUDGETS, DEFAULT_BUDGET, budget_of  # noqa: E402
from ablations.compose import placement, prepare_reference, resolve  # noqa: E402
from ablations.jobs import GONE_AFTER_HOURS  # noqa: E402
from ablations.local import run_local  # noqa: E402
from ablations.patch_fid import score_finished  # noqa: E402
from ablations.restat import restat  # noqa: E402
from ablations.rows import TABLES, rows_of  # noqa: E402
from ablations.slurm import slurm_param, submit_slurm  # noqa: E402
from ablations.stages import stage_lines  # noqa: E402
from ablations.status import collect, row_status  # noqa: E402

DEFAULT_OUT = ROOT / "ablations" / "runs"


def warn_if_inside_checkout(out: Path, args: argparse.Namespace) -> None:
    """A loud note when full-size rows would write their run folders inside the checkout."""
    if budget_of(args.budget).large and out.resolve().is_relative_to(ROOT):
        bar = "!" * 100
        print(
            f"{bar}\n[ablations] the run folders go to {out}, INSIDE the checkout: at the {args.budget} budget a row "
            f"writes its checkpoints there (several GB a row, ~15 GB at the paper budget with its milestones).\n"
            f"[ablations] pass --out on a scratch file system, e.g. --out /scratch/$USER/dico-ablations\n{bar}",
            file=sys.stderr,
            flush=True,
        )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", "status", "collect", "patch-fid", "restat") else "run"
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--table", choices=sorted(TABLES), required=True)
    p.add_argument("--budget", choices=list(BUDGETS), default=DEFAULT_BUDGET)
    p.add_argument("--rows", nargs="+", help="paper row names (default: every row of the table)")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="seeds (seed_everything) of every row (default: the budget's, "
        "ablations/budgets.py; collect: every seed found)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folders: <out>/<budget>/<model>/seed<k>")
    p.add_argument(
        "--results",
        type=Path,
        help="tables and plots (default: <out>/results; the committed ones: --results ablations/results)",
    )
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--devices", type=int, help="local: devices per row (the global batch is kept)")
    p.add_argument(
        "--nodes",
        type=int,
        help="slurm: nodes per row (default: the config's trainer.num_nodes; the trainer is set to match)",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        help="slurm: GPUs (= tasks) per node (default: the config's trainer.devices; the trainer is set to match)",
    )
    p.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per task (default: data.num_workers + 1)")
    p.add_argument("--mem-gb", type=float, help="slurm: memory per node in GB (default: the partition's)")
    p.add_argument(
        "--slurm-param",
        action="append",
        type=slurm_param,
        metavar="KEY=VALUE",
        help="slurm: one more sbatch option, e.g. --slurm-param qos=high --slurm-param constraint=a100 "
        "(submitit's slurm_additional_parameters; repeatable)",
    )
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time", type=int, default=4320, help="slurm time limit per job (minutes); jobs requeue")
    p.add_argument(
        "--signal-delay",
        type=int,
        default=300,
        help="slurm: seconds before the time limit at which the job saves last.ckpt at the step reached and requeues "
        "(submitit's USR2); more than a step plus the save ('checkpoint ...: written in S s' in the log)",
    )
    p.add_argument("--account", help="slurm account")
    p.add_argument(
        "--forget",
        action="store_true",
        help="slurm: submit the rows again whose job sacct does not know (status 'unknown'), at once rather than "
        f"after {GONE_AFTER_HOURS} h without a sign of life; a job sacct shows queued or running is left alone",
    )
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
    p.add_argument(
        "extra", nargs="*", help="after --: more cli.py options for every row, e.g. -- --trainer.precision bf16-mixed"
    )
    args = p.parse_args(argv)
    args.command = command
    args.overrides = list(args.extra)  # the user's cli.py options (placement options are added to extra later)
    slurm_only = ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "slurm_param", "forget")
    if args.launcher == "local" and any(getattr(args, name) for name in slurm_only):
        options = "/".join("--" + name.replace("_", "-") for name in slurm_only)
        p.error(f"{options} are for --launcher slurm; locally use --devices")
    if args.forget and command != "run":
        p.error(
            f"--forget submits rows again: give it to a run (`run.py --launcher slurm ... --forget`), not {command}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out.resolve()
    args.results = args.results or out / "results"  # never the committed tables unless asked for
    budget = budget_of(args.budget)
    rows = rows_of(args.table, args.budget, args.rows, args.seeds or list(budget.seeds))
    command = "python ablations/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    args.command_line = command
    if args.command == "status":
        for row in rows:
            print(f"{row.row:<26} {row.key:<40} {row_status(row, out)}")
        return 0
    if args.command == "restat":  # a table an older runner wrote, with today's statistics (no run folders needed)
        print("wrote " + ", ".join(str(x) for x in restat(args.table, args.budget, args.results)))
        return 0
    if args.command == "collect":
        collect(args.table, args.budget, out, args.results, command, args.seeds, args.overrides)
        return 0
    if args.command == "patch-fid":
        if not budget.patch_fid:
            scored = ", ".join(b.name for b in BUDGETS.values() if b.patch_fid)
            raise SystemExit(f"the patch FID is a score of the {scored} budget(s), not of {args.budget}")
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
    if budget.patch_fid:  # the budget's second score, from the finished rows' checkpoints
        unscored = score_finished(
            [r.run_dir(out) for r in dict.fromkeys(rows)], resolve(rows[0], out, args.extra), out, args.budget
        )
        failed += [row for row in rows if row.run_dir(out) in unscored]
    collect(args.table, args.budget, out, args.results, command, None, args.overrides)
    if failed:
        print(f"[ablations] failed: {[r.key for r in failed]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
