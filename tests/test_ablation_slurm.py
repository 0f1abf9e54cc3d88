"""The ablation runner on SLURM without a cluster: submitit's own SLURM executor talking to stand-in ``sbatch`` /
``sacct`` / ``srun`` commands that record submissions and answer job states, and submitit's own signal handler for
the requeue path. What is checked: a row is submitted once across invocations and tables, a stopped job requeues
without being called failed, ``status`` tells the job's state and real log, and the job asks SLURM for exactly what
the trainer will use."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
from lightning.pytorch import Callback
from submitit import JobEnvironment
from submitit.slurm.slurm import SlurmJob

from ablations import jobs, run, stages, status
from ablations import slurm as slurm_jobs
from ablations.rows import rows_of

SBATCH = """#!/bin/sh
# stand-in sbatch: keeps the script, answers with the next job id
dir=$(dirname "$0")
n=$(( $(cat "$dir/next_id" 2>/dev/null || echo 1000) + 1 ))
echo $n > "$dir/next_id"
cp "$1" "$dir/submitted_$n.sh"
echo "Submitted batch job $n"
"""
SACCT = """#!/bin/sh
# stand-in sacct: the states the test wrote
echo "JobID|State|NodeList"
cat "$(dirname "$0")/states" 2>/dev/null
"""


class Cluster:
    """The stand-in SLURM: ``submitted()`` lists the sbatch scripts; ``set(job, state)`` is what sacct answers."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.states: dict[str, str] = {}

    def submitted(self) -> dict[str, str]:
        return {p.stem.split("_")[1]: p.read_text() for p in sorted(self.bin.glob("submitted_*.sh"))}

    def set(self, job_id: str, state: str) -> None:
        self.states[job_id] = state
        (self.bin / "states").write_text("".join(f"{j}|{s}|node1\n" for j, s in self.states.items()))


@pytest.fixture
def cluster(tmp_path, monkeypatch) -> Cluster:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("sacct", SACCT), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    SlurmJob.watcher.clear()  # submitit caches the states of ended jobs per process; job ids restart in each test
    return Cluster(bin_dir)


def slurm(out: Path, table: str, *rows: str, more: tuple[str, ...] = ()) -> list[str]:
    return [
        "--table",
        table,
        "--budget",
        "paper",
        "--launcher",
        "slurm",
        "--cluster",
        "slurm",
        "--out",
        str(out),
        "--results",
        str(out / "results"),
        *more,
        "--rows",
        *rows,
    ]


def test_a_row_is_submitted_once_across_invocations_and_tables(tmp_path, cluster, capsys):
    """Table 3 then Table 4 before either finishes: the shared rows (DiCo-S, DiT-U) keep their one job; a rerun
    while jobs are pending submits nothing; a job that ended without a result is submitted again."""
    out = tmp_path / "runs"
    assert run.main(slurm(out, "3", "DiCo (U-shape)", "DiT (U-shape)")) == 0
    first = cluster.submitted()
    assert len(first) == 2
    ids = {d: json.loads((out / "paper" / d / "seed0" / "job.json").read_text())["job_id"] for d in ("dico-s", "dit-u")}
    assert set(ids.values()) == set(first)
    for job in first:
        cluster.set(job, "PENDING")
    capsys.readouterr()
    assert run.main(slurm(out, "4", "DiCo-S", "CM->Self-Attn", "w/o CCA")) == 0  # only w/o CCA is new
    printed = capsys.readouterr().out
    assert len(cluster.submitted()) == 3
    assert f"job {ids['dico-s']} is PENDING; not resubmitted" in printed
    assert f"job {ids['dit-u']} is PENDING; not resubmitted" in printed
    cluster.set(ids["dit-u"], "RUNNING")
    [nocca] = set(cluster.submitted()) - set(first)
    cluster.set(nocca, "REQUEUED")
    assert run.main(slurm(out, "4", "DiCo-S", "CM->Self-Attn", "w/o CCA")) == 0
    assert len(cluster.submitted()) == 3  # pending, running and requeued jobs are left alone
    cluster.set(ids["dico-s"], "FAILED")
    assert run.main(slurm(out, "3", "DiCo (U-shape)", "DiT (U-shape)")) == 0
    submitted = cluster.submitted()
    assert len(submitted) == 4
    [again] = set(submitted) - set(first) - {nocca}
    assert json.loads((out / "paper" / "dico-s" / "seed0" / "job.json").read_text())["job_id"] == again


def test_the_job_asks_slurm_for_what_the_trainer_uses(tmp_path, cluster):
    """Nodes x GPUs x tasks come from the composed trainer config (8 devices at the paper budget), or set both from
    --nodes/--gpus-per-node; CPUs per task default to num_workers + 1; memory and extra sbatch options pass through;
    submitit's time-limit signal comes --signal-delay (300) s ahead of the limit."""
    out = tmp_path / "runs"
    assert (
        run.main(
            slurm(
                out,
                "4",
                "DiCo-S",
                more=("--mem-gb", "64", "--slurm-param", "qos=high", "--slurm-param", "constraint=a100"),
            )
        )
        == 0
    )
    [script] = cluster.submitted().values()
    for line in (
        "--nodes=1",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=9",
        "--mem=64GB",
        "--requeue",
        "--qos=high",
        "--constraint=a100",
        "--signal=USR2@300",
    ):
        assert f"#SBATCH {line}\n" in script, line
    # 2 nodes x 4 GPUs: the trainer is moved there too (global batch 256 kept: 32 a device), and 3 CPUs a task
    assert (
        run.main(slurm(out, "4", "w/o CCA", more=("--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "3"))) == 0
    )
    [(job_id, script)] = [(j, s) for j, s in cluster.submitted().items() if "--nodes=2" in s]
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=3"):
        assert f"#SBATCH {line}\n" in script, line
    with open(out / "submitit" / job_id / f"{job_id}_submitted.pkl", "rb") as f:
        job = pickle.load(f).function
    assert job.extra == ["--trainer.num_nodes", "2", "--trainer.devices", "4", "--data.init_args.batch_size", "32"]


def test_slurm_parameters_refuse_a_device_count_they_cannot_know():
    args = run.parse(["--table", "4", "--launcher", "slurm"])
    config = {"trainer": {"devices": "auto", "num_nodes": 1}, "data": {"init_args": {"num_workers": 2}}}
    with pytest.raises(SystemExit, match="--gpus-per-node"):
        slurm_jobs.slurm_parameters(config, args)
    config["trainer"].update(devices=2, accelerator="cpu")
    params = slurm_jobs.slurm_parameters(config, args)
    assert (params["tasks_per_node"], params["gpus_per_node"], params["cpus_per_task"]) == (2, 0, 3)


def test_status_tells_the_jobs_state_and_its_real_log(tmp_path, cluster):
    out = tmp_path / "runs"
    rows = rows_of("4", "paper", ["DiCo-S", "w/o CCA", "CCA->SE module", "GELU->ReLU", "3x3->5x5 DWC"])
    assert run.main(slurm(out, "4", *(r.row for r in rows))) == 0
    ids = [json.loads((r.run_dir(out) / "job.json").read_text())["job_id"] for r in rows]
    logs = [out / "submitit" / j / f"{j}_0_log.out" for j in ids]  # where submitit writes rank 0's output
    for job, state in zip(ids, ["PENDING", "RUNNING", "PENDING", "FAILED", "TIMEOUT"], strict=True):
        cluster.set(job, state)
    (rows[1].run_dir(out) / "csv").mkdir()
    (rows[1].run_dir(out) / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,99,0.5\n")
    (rows[2].run_dir(out) / "requeued.json").write_text(json.dumps([{"job_id": ids[2]}]))  # requeued once
    states = [status.row_status(r, out) for r in rows]
    assert states[0] == f"queued (job {ids[0]} PENDING; log: {logs[0]})"
    assert states[1] == f"running (job {ids[1]} RUNNING, step 99, loss 0.5000; log: {logs[1]})"
    assert states[2] == f"requeued (job {ids[2]} PENDING, 1 requeue(s), no last.ckpt yet, starts over; log: {logs[2]})"
    assert states[3] == f"failed (job {ids[3]} FAILED without a result; log: {logs[3]})"
    assert states[4] == f"failed (job {ids[4]} TIMEOUT without a result; log: {logs[4]})"


def test_a_job_unknown_to_sacct_is_told_and_forgotten_on_request_or_after_a_day(tmp_path, cluster, capsys):
    """sacct does not list a job (just submitted, or purged): status says `unknown` and the row is not resubmitted;
    `--forget` submits it again at once (a running job is left alone); with no sign of life for over
    GONE_AFTER_HOURS (24 h) it is `gone` and the next run submits it again by itself."""
    out, hours = tmp_path / "runs", jobs.GONE_AFTER_HOURS
    rows = rows_of("4", "paper", ["DiCo-S", "w/o CCA"])
    assert status.row_status(rows[0], out) == "not submitted"
    assert run.main(slurm(out, "4", *(r.row for r in rows))) == 0
    unknown, running = (json.loads((r.run_dir(out) / "job.json").read_text())["job_id"] for r in rows)
    cluster.set(running, "RUNNING")  # sacct lists only this one
    log = out / "submitit" / unknown / f"{unknown}_0_log.out"
    assert status.row_status(rows[0], out) == (
        f"unknown (job {unknown} unknown to sacct, no sign of life for 0.0 h: counted as gone after {hours} h, or "
        f"submit it again now with --forget; log: {log})"
    )
    capsys.readouterr()
    assert run.main(slurm(out, "4", *(r.row for r in rows))) == 0
    assert len(cluster.submitted()) == 2  # neither is resubmitted
    assert f"job {unknown} is UNKNOWN; not resubmitted" in capsys.readouterr().out
    # --forget: the unknown job's row is submitted again, the running one is not
    assert run.main(slurm(out, "4", *(r.row for r in rows), more=("--forget",))) == 0
    printed = capsys.readouterr().out
    assert f"job {unknown} unknown to sacct: forgotten (--forget)" in printed
    assert f"`scancel {running}` first" in printed
    [again] = set(cluster.submitted()) - {unknown, running}
    assert json.loads((rows[0].run_dir(out) / "job.json").read_text())["job_id"] == again
    # the age rule: `again` unknown too, submitted an hour more than that ago, no write to its submitit folder since
    record_path = rows[0].run_dir(out) / "job.json"
    record = json.loads(record_path.read_text())
    old = time.time() - (hours + 1) * 3600
    record["submitted"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(old))
    record_path.write_text(json.dumps(record))
    for path in (out / "submitit" / again).iterdir():
        os.utime(path, (old, old))
    assert status.row_status(rows[0], out).startswith(
        f"gone (job {again} unknown to sacct, no sign of life for {hours + 1:.1f} h, over {hours} h: the next run "
        f"submits it again;"
    )
    assert run.main(slurm(out, "4", *(r.row for r in rows))) == 0
    assert (
        f"job {again} unknown to sacct, no sign of life for over {hours} h: counted as gone" in capsys.readouterr().out
    )
    assert len(cluster.submitted()) == 4  # `again` resubmitted; the running job still not
    assert status.row_status(rows[1], out).startswith(f"running (job {running} RUNNING;")
    with pytest.raises(SystemExit):  # status only reads: --forget there would do nothing
        run.parse(["status", *slurm(out, "4", "DiCo-S", more=("--forget",))])


# ------------------------------------------------------------------------------------ inside the job
SMOKE = {"trainer": {"max_steps": 4}, "fid": {"init_args": {"test_num_samples": 0}}}


@pytest.fixture
def in_job(tmp_path, monkeypatch):
    """This process as task 0 of a submitit local job (job id 4242), with submitit's own signal handlers installed
    as its job runner does (restored afterwards)."""
    import submitit
    from submitit.core.utils import DelayedSubmission

    folder = tmp_path / "submitit" / "4242"
    folder.mkdir(parents=True)
    for name, value in (
        ("SUBMITIT_EXECUTOR", "local"),
        ("SUBMITIT_LOCAL_JOB_ID", "4242"),
        ("SUBMITIT_LOCAL_GLOBALID", "0"),
        ("SUBMITIT_LOCAL_LOCALID", "0"),
        ("SUBMITIT_LOCAL_NTASKS", "1"),
        ("SUBMITIT_FOLDER", str(folder)),
        ("WANDB_RUN_ID", ""),
        ("WANDB_RESUME", ""),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(slurm_jobs, "resolve", lambda *a: SMOKE)
    monkeypatch.setattr(slurm_jobs, "finalize", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    row = rows_of("4", "smoke", ["DiCo-S"])[0]
    job = slurm_jobs.RowJob(row, tmp_path / "runs", run.parse(["--table", "4"]), [])
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, 3)
    env = submitit.JobEnvironment()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT, env._usr_sig())}
    env._handle_signals(env.paths, delayed)
    yield job, env
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_sigterm_stop_requeues_through_submitit_and_is_no_failure(in_job, monkeypatch):
    """Lightning stopped on SIGTERM (last.ckpt saved, exit status 75): rank 0 takes submitit's checkpoint-and-requeue
    path (the local executor's requeue exit); the stale failed.json of an earlier attempt is gone, none is written."""
    import cli

    job, env = in_job
    run_dir = job.row.run_dir(job.out)
    run_dir.mkdir(parents=True)
    (run_dir / "failed.json").write_text('{"log": "old"}')  # an earlier attempt's
    monkeypatch.setattr(cli, "main", lambda argv: 75)
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == 144  # submitit's local requeue
    assert not (run_dir / "failed.json").exists()
    assert len(json.loads((run_dir / "requeued.json").read_text())) == 1
    from submitit.core.utils import DelayedSubmission

    again = DelayedSubmission.load(env.paths.submitted_pickle)  # what the requeued job will run
    assert again.function.row == job.row and again.function.extra == job.extra


def test_a_timeout_signal_requeues_and_is_no_failure_but_a_crash_is(in_job, monkeypatch):
    import cli

    job, env = in_job
    run_dir = job.row.run_dir(job.out)

    def timed_out(argv):
        os.kill(os.getpid(), env._usr_sig())  # SLURM's signal_delay_s warning, mid-training
        return 0

    monkeypatch.setattr(cli, "main", timed_out)
    with pytest.raises(SystemExit):
        job()
    assert not (run_dir / "failed.json").exists() and (run_dir / "requeued.json").exists()
    monkeypatch.setattr(cli, "main", lambda argv: 1)
    job._requeued = False
    with pytest.raises(RuntimeError, match="exit status 1"):
        job()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["log"] == str(env.paths.stdout) and failed["log"].endswith("4242/4242_0_log.out")
    assert failed["rank"] == 0 and "exit status 1" in failed["error"]


class TimeLimitAt(Callback):
    """Sends this process submitit's time-limit signal after the training step that reaches ``step``: what SLURM sends
    ``--signal-delay`` seconds before the job's time limit (the local executor: ``signal_delay_s`` before its own)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.Signals["SIG" + JobEnvironment.USR_SIG])


def test_a_job_stopped_by_its_time_limit_resumes_from_the_step_it_reached(in_job, caplog):
    """The time-limit signal at step 3 of 6, periodic saves every 100 steps: the job saves last.ckpt at step 3 and
    takes submitit's requeue (the local executor's exit status 144), not a failure; the requeued job (what submitit
    pickled for it) resumes at step 3, not from scratch, and finishes."""
    from submitit.core.utils import DelayedSubmission

    job, env = in_job
    limit = {"class_path": "tests.test_ablation_slurm.TimeLimitAt", "init_args": {"step": 3}}
    job.extra = [
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "100",
        "--checkpoint.every_n_train_steps",
        "100",
        "--fid",
        "null",
        "--trainer.callbacks+",
        json.dumps(limit),
    ]
    run_dir = job.row.run_dir(job.out)
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == 144  # submitit's local requeue
    last = stages.last_checkpoint(run_dir)
    assert stages.checkpoint_step(run_dir) == 3
    assert [r["resumes_from_step"] for r in json.loads((run_dir / "requeued.json").read_text())] == [3]
    assert f"SIG{JobEnvironment.USR_SIG}: saved {last} at step 3" in caplog.text
    caplog.clear()
    again = DelayedSubmission.load(env.paths.submitted_pickle).function
    again()  # the requeued job
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text
    assert stages.checkpoint_step(run_dir) == 6 and not (run_dir / "failed.json").exists()


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_preempted_local_job_requeues_resumes_and_finishes(tmp_path, monkeypatch):
    """submitit's local executor (real processes): SIGTERM to a training job -> last.ckpt at the current step ->
    submitit's requeue (same job id) -> the row resumes from that step and finishes; never marked failed."""
    from dico.checkpoints import read_checkpoint

    out = tmp_path / "runs"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the jobs inherit this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = [
        "--table",
        "4",
        "--budget",
        "smoke",
        "--rows",
        "w/o CCA",
        "--launcher",
        "slurm",
        "--cluster",
        "local",
        "--out",
        str(out),
        "--results",
        str(tmp_path / "results"),
        "--",
        "--trainer.max_steps",
        "60",
    ]
    assert run.main(argv) == 0
    run_dir = out / "smoke" / "dico-s-nocca" / "seed0"
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    log = out / "submitit" / job_id / f"{job_id}_0_log.out"
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # training, with Lightning's signal handlers on
        state = jobs.job_state(jobs.job_record(run_dir))[0]
        assert time.time() < deadline and state == "RUNNING", log.read_text()
        time.sleep(0.05)  # the SIGTERM must land before step 60 on a fast machine too
    os.kill(int(job_id), signal.SIGTERM)  # the local controller forwards it to the task, as SLURM does
    while not ((run_dir / "result.json").exists() or (run_dir / "failed.json").exists()):
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    text = log.read_text()
    assert not (run_dir / "failed.json").exists(), text[-3000:]
    [requeue] = json.loads((run_dir / "requeued.json").read_text())
    assert requeue["job_id"] == job_id and 0 < requeue["resumes_from_step"] < 60
    assert "preempted (SIGTERM)" in text and f"Requeued job {job_id}" in text
    result = json.loads((run_dir / "result.json").read_text())
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert result["steps"] == ckpt["global_step"] == 60
    assert status.row_status(rows_of("4", "smoke", ["w/o CCA"])[0], out).startswith("finished (FID")
