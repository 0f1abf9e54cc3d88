"""The ablation runner: rows as configs, the local and SLURM (submitit) launchers, resume, status and the report."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ablations import compose, local, report, run, slurm, stages, status
from ablations.budgets import Budget, budget_of
from ablations.rows import CONFIGS, ROOT, Row, rows_of, slug
from dico.checkpoints import read_checkpoint
from dico.models.ablation import ABLATION_ROWS, TABLE3, TABLE4, VARIANTS

# wandb disabled: its offline runs are tested with the quickstart; here it would add seconds to every process
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def first_loss(run_dir: Path) -> tuple[int, float]:
    rows = [r for r in read_csv(run_dir / "csv" / "metrics.csv") if r.get("train/loss")]
    return int(rows[0]["step"]), float(rows[0]["train/loss"])


def ckpt_step(run_dir: Path) -> int:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]


# ------------------------------------------------------------------------------------------------ configs
def test_every_row_has_its_overlays_and_runs_are_keyed_by_model():
    overlays = {p for p in (CONFIGS / "rows").rglob("*.yaml")}
    assert overlays == {Row("3", "x", m, b).overlay() for m in VARIANTS for b in ("paper", "proxy", "crops16")}
    for (table, name), entry in ABLATION_ROWS.items():
        for budget in ("paper", "proxy", "crops16"):
            row = Row("3" if table == TABLE3 else "4", name, entry.model, budget)
            assert yaml.safe_load(row.overlay().read_text())["model"]["model"] == entry.model
    # the two models of both tables train once per budget and seed
    keys3 = {r.key for r in rows_of("3", "proxy")}
    keys4 = {r.key for r in rows_of("4", "proxy")}
    assert keys3 & keys4 == {"proxy/dico-s/seed0", "proxy/dit-u/seed0"}  # DiT (U-shape) = CM->Self-Attn
    assert len(keys3 | keys4) == 15


def test_proxy_overlays_follow_the_scaling_rule():
    """The committed reduced-size rows are what dico.shape_search.proxy_shape gives (a plain and a re-adjusted one),
    and the re-adjusted one keeps the paper's #params and Gflops ratios to DiCo-S within the rule's 3%."""
    from dico.models.ablation import paper_row
    from dico.shape_search import proxy_shape

    ref = proxy_shape("DiCo-S")
    for name in ("DiCo-S-DWC5", "DiCo-S-noCCA"):
        shape = proxy_shape(name)
        committed = yaml.safe_load(Row("4", "x", name, "proxy").overlay().read_text())["model"]["model_kwargs"]
        expected = {k: list(v) if isinstance(v, tuple) else v for k, v in shape.overrides.items()}
        assert committed == expected
    p, q = paper_row(TABLE4, "w/o CCA"), paper_row(TABLE4, "DiCo-S")
    nocca = proxy_shape("DiCo-S-noCCA")
    assert nocca.params / ref.params == pytest.approx(p["params_M"] / q["params_M"], rel=0.03)
    assert nocca.macs / ref.macs == pytest.approx(p["gflops"] / q["gflops"], rel=0.03)
    assert ref.overrides["hidden_size"] * 4 == VARIANTS["DiCo-S"].kwargs["hidden_size"]


def test_every_proxy_row_builds_through_the_cli(tmp_path, monkeypatch):
    """Each proxy row's composed configs (base + table + budget + row) instantiate the model, data, callbacks and
    trainer that ``cli.py fit`` would run (the proxy itself trains for minutes per row: not in CI)."""
    import cli
    from dico.callbacks import FIDEvaluation

    monkeypatch.chdir(ROOT)
    seen = set()
    for row in rows_of("3", "proxy", seeds=[3]) + rows_of("4", "proxy", seeds=[3]):
        if row.key in seen:
            continue
        seen.add(row.key)
        args = [a for a in row.cli_args(tmp_path) if a != "fit"]
        built = cli.build_lightning_cli([*args, "--trainer.logger", "false"], run=False)
        assert built.model.hparams.model == row.model
        assert built.model.hparams.seed == 3 and built.datamodule.seed == 3  # seeds are replicates, rows paired
        assert built.trainer.max_steps == 400 and built.datamodule.batch_size == 64
        [fid] = [c for c in built.trainer.callbacks if isinstance(c, FIDEvaluation)]
        # scored by the last periodic evaluation (1000 samples), no test protocol
        assert fid.test_set is None and fid.every_n_steps == 400 and fid.sample_set.num_samples == 1000
    assert len(seen) == 15
    with pytest.raises(ValueError, match="test protocol off"):  # `cli.py test` on such a row says why it cannot
        fid.setup(built.trainer, built.model, "test")


def test_crops16_budget_composes_every_table4_row(tmp_path, monkeypatch):
    """Every Table 4 row at the crops16 budget builds through the CLI on 16x16 scikit-image crops, scored by the
    held-out loss alone (one fit stage, no FID), with every source of training randomness following the seed."""
    import cli
    from dico.callbacks import FIDEvaluation, HeldOutLoss
    from dico.data import ImageCropsDataModule

    monkeypatch.chdir(ROOT)
    rows = rows_of("4", "crops16", seeds=[3])
    assert len(rows) == 11
    for row in rows:
        args = [a for a in row.cli_args(tmp_path) if a != "fit"]
        built = cli.build_lightning_cli([*args, "--trainer.logger", "false"], run=False)
        net, dm = built.model.model, built.datamodule
        assert built.model.hparams.model == row.model and (net.input_size, net.in_channels, net.num_classes) == (
            16,
            1,
            10,
        )
        assert isinstance(dm, ImageCropsDataModule) and dm.sample_shape == (1, 16, 16) and dm.num_classes == 10
        assert (
            built.model.hparams.seed == 3
            and dm.seed == 3
            and built.trainer.default_root_dir == str(row.run_dir(tmp_path))
        )
        assert [type(c) for c in built.trainer.callbacks if isinstance(c, HeldOutLoss | FIDEvaluation)] == [HeldOutLoss]
        [heldout] = [c for c in built.trainer.callbacks if isinstance(c, HeldOutLoss)]
        assert heldout.steps == set(range(100, 1601, 100))  # every row scored along the way at the same steps
    # what --dry-run prints: one fit stage per row
    assert [s[0] for s in stages.stages(rows[0], tmp_path, [])] == ["fit"]


def test_crops16_windows_and_agents_keep_the_full_size_order_against_the_3x3_conv(tmp_path):
    """At full size (stage maps 32, 16, 8) a window sees 64 tokens: more than the 3x3 conv's 9, 1/16 of the first
    stage, 1/4 of the second, all of the middle one. The crops16 rows' windows (measured on the built model's
    stages) keep every one of these; the digits rows' 2x2 windows see fewer tokens than the conv."""
    from dico.models import create_model
    from dico.models.attention import AgentAttention2d, WindowAttention2d

    def windows(model: str, budget: str) -> tuple[list[tuple[int, int]], list[torch.nn.Module]]:
        kwargs = yaml.safe_load(Row("4", "x", model, budget).overlay().read_text())["model"]["model_kwargs"]
        net = create_model(model, **kwargs).eval()
        seen: list[tuple[int, int]] = []  # (stage map side, tokens per window) of every window-attention block
        for m in net.modules():
            if isinstance(m, WindowAttention2d):
                m.register_forward_pre_hook(
                    lambda m, a: seen.append((a[0].shape[1], m.windowing(*a[0].shape[1:3])[0] ** 2))
                )
        size = kwargs["input_size"]
        net(torch.randn(1, 1, size, size), torch.tensor([500.0]), torch.tensor([0]))
        return sorted(set(seen), reverse=True), [m for m in net.modules() if isinstance(m, AgentAttention2d)]

    conv = 3 * 3
    full_window = VARIANTS["DiCo-S-WindowAttn"].kwargs["mixer_kwargs"]["window_size"]
    full = [(side, min(full_window, side) ** 2) for side in (32, 16, 8)]
    assert full == [(32, 64), (16, 64), (8, 64)]
    crops, _ = windows("DiCo-S-WindowAttn", "crops16")
    assert [side for side, _ in crops] == [16, 8, 4]
    for (side, tokens), (full_side, full_tokens) in zip(crops, full, strict=True):
        assert tokens / side**2 == full_tokens / full_side**2  # the same fraction of every stage
        assert conv < tokens <= side**2
    digits, _ = windows("DiCo-S-WindowAttn", "proxy")
    assert digits[0] == (8, 4) and digits[0][1] < conv  # why the digits proxy cannot test locality
    _, agents = windows("DiCo-S-AgentAttn", "crops16")
    full_agents = VARIANTS["DiCo-S-AgentAttn"].kwargs["mixer_kwargs"]["agent_num"]
    assert full_agents == 49 and {a.agent_num for a in agents} == {16}
    assert all(conv < a.agent_num <= a.resolution[0] * a.resolution[1] for a in agents)


def test_smoke_rows_validate_on_one_batch_not_the_whole_split(tmp_path, monkeypatch):
    import cli

    monkeypatch.chdir(ROOT)
    [row] = rows_of("4", "smoke", ["w/o CCA"])
    built = cli.build_lightning_cli(
        [*[a for a in row.cli_args(tmp_path) if a != "fit"], "--trainer.logger", "false"], run=False
    )
    # the YAML's 1 is one batch; read as the float 1.0 it would mean 100% of them
    assert built.trainer.limit_val_batches == 1 and isinstance(built.trainer.limit_val_batches, int)
    assert built.trainer.max_steps == 4


def test_global_batch_is_kept_or_rejected():
    config = {
        "trainer": {"num_nodes": 1, "devices": 8, "accumulate_grad_batches": 1},
        "data": {"init_args": {"batch_size": 32}},
    }
    assert compose.placement(config, 2, 8) == [
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "8",
        "--data.init_args.batch_size",
        "16",
    ]
    assert compose.placement(config, None, None) == []
    with pytest.raises(SystemExit, match="does not divide over 1 node"):
        compose.placement(config, 1, 3)
    with pytest.raises(SystemExit, match="does not divide"):
        compose.placement(config, 64, 8)  # 512 devices for a global batch of 256: never floored to 0


def test_slurm_job_parameters_and_requeue(tmp_path, monkeypatch):
    """What `--launcher slurm --nodes 2 --gpus-per-node 8 ...` asks SLURM for (the sbatch script submitit would
    submit), and that a preempted/timed-out job requeues itself with the same row (it then resumes from last.ckpt)."""
    import submitit

    fake_srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor only checks that srun exists
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 1\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}{os.pathsep}{os.environ['PATH']}")

    args = run.parse(
        [
            "--table",
            "4",
            "--budget",
            "paper",
            "--launcher",
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--time",
            "600",
            "--account",
            "acc",
        ]
    )
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    # the job's shape comes from the composed trainer config after --nodes/--gpus-per-node moved it (one source)
    placed = {"trainer": {"num_nodes": 2, "devices": 8, "accelerator": "auto"}, "data": {"init_args": {}}}
    executor.update_parameters(**slurm.slurm_parameters(placed, args))
    text = executor._executor._make_submission_file_text("python -c pass", "UID")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=600",
        "--account=acc",
        "--requeue",
    ):
        assert f"#SBATCH {line}" in text
    row = rows_of("4", "paper", ["w/o CCA"])[0]
    job = slurm.RowJob(row, tmp_path / "out", args, ["--trainer.devices", "8"])
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.row == row and again.function.extra == job.extra


# ------------------------------------------------------------------------------------------- end to end
def runner(*argv: str) -> list[str]:
    return [sys.executable, str(ROOT / "ablations" / "run.py"), *argv]


@pytest.mark.slow
def test_local_runner_trains_like_the_cli_resumes_a_killed_row_and_skips_finished_ones(tmp_path, capsys, monkeypatch):
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = [
        "--table",
        "4",
        "--budget",
        "smoke",
        "--rows",
        "w/o CCA",
        "--out",
        str(out),
        "--results",
        str(results),
        "--",
        "--trainer.max_steps",
        "30",
    ]
    run_dir = out / "smoke" / "dico-s-nocca" / "seed0"
    # the row's fit command as `--dry-run` prints it for a researcher to run by hand
    [fit, _] = stages.stage_lines(rows_of("4", "smoke", ["w/o CCA"]), out, argv[-2:])
    # 1. kill the runner mid-row: its training process checkpoints on the way out
    with open(tmp_path / "runner.log", "w") as log:
        proc = subprocess.Popen(runner(*argv), cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "runner.log").read_text()[-3000:]
        time.sleep(0.05)  # the kill must land before step 30 on a fast machine too (last.ckpt appears at step 2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    # the training process (SIGTERM on its parent's death) saves last.ckpt after its current step, then says so
    deadline = time.time() + 120
    while "preempted (SIGTERM)" not in (run_dir / "run.log").read_text():
        assert time.time() < deadline, (run_dir / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    killed_at = ckpt_step(run_dir)
    assert 0 < killed_at < 30 and not (run_dir / "result.json").exists()
    runner_first_loss = first_loss(run_dir)  # (a resumed run starts a new CSV log)
    # 2. rerun: the row resumes from its checkpoint and finishes
    assert subprocess.run(runner(*argv), cwd=tmp_path, env=ENV, capture_output=True).returncode == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == ckpt_step(run_dir) == 30
    assert f"--ckpt_path {run_dir}/checkpoints/last.ckpt" in (run_dir / "run.log").read_text().split("$ ")[-2]
    assert result["metrics"]["frechet_inception_distance"] > 0 and result["eval_samples"] == 20
    # 3. the same row through `python cli.py fit` with the runner's configs: the same first losses
    cli_dir = tmp_path / "by-hand"
    cmd = fit.replace(str(run_dir), str(cli_dir)).split()[1:]
    assert cmd[:2] == ["cli.py", "fit"]
    import cli  # in this process: `python cli.py ARGS` is `cli.main(ARGS)`

    monkeypatch.chdir(ROOT)
    assert cli.main([*cmd[1:], "--trainer.max_steps", "2"]) == 0
    monkeypatch.undo()
    step, loss = first_loss(cli_dir)
    assert (step, loss) == pytest.approx(runner_first_loss, rel=1e-6)
    # 4. a finished row is skipped
    capsys.readouterr()
    assert run.main(argv) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert run.main(["status", *argv[:8]]) == 0
    assert "finished (FID" in capsys.readouterr().out


@pytest.mark.slow
def test_slurm_launcher_through_submitits_local_executor(tmp_path, capsys, monkeypatch):
    """Two rows as two real submitit jobs (local executor: real subprocesses), running at once."""
    out = tmp_path / "runs"
    argv = [
        "--table",
        "4",
        "--budget",
        "smoke",
        "--rows",
        "DiCo-S",
        "CCA->SE module",
        "--launcher",
        "slurm",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--cluster",
        "local",
        "--out",
        str(out),
        "--results",
        str(tmp_path / "results"),
    ]
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the jobs inherit this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    job_ids = [line.rsplit(" ", 1)[-1] for line in printed.splitlines() if ": job " in line]
    assert len(job_ids) == 2
    dirs = [out / "smoke" / key / "seed0" for key in ("dico-s", "dico-s-se")]
    assert {json.loads((d / "job.json").read_text())["job_id"] for d in dirs} == set(job_ids)
    deadline = time.time() + 900
    while not all((d / "result.json").exists() or (d / "failed.json").exists() for d in dirs):
        assert time.time() < deadline, "the submitit jobs did not finish"
        time.sleep(2)
    for d in dirs:
        result = json.loads((d / "result.json").read_text())
        assert result["steps"] == 4 and result["throughput_ratio"] > 0
        assert (out / "submitit" / json.loads((d / "job.json").read_text())["job_id"]).is_dir()
    assert run.main(["collect", *argv[:4], "--out", str(out), "--results", str(tmp_path / "results")]) == 0
    rows = read_csv(tmp_path / "results" / "table4-smoke.csv")
    assert [r["row"] for r in rows if r["fid"]] == ["DiCo-S", "CCA->SE module"]


# ---------------------------------------------------------------------------------------------- report
def fake_result(table: str, row: str, model: str, seed: int, fid: float, ratio: float) -> dict:
    from dico.models.ablation import paper_row

    entry = ABLATION_ROWS[TABLE3 if table == "3" else TABLE4, row]
    size = {"params": 2_000_000 + 1000 * len(model), "gmacs": 0.018}
    return {
        "table": table,
        "row": row,
        "model": model,
        "budget": "proxy",
        "seed": seed,
        "model_kwargs": {"x": 1},
        "note": entry.note,
        "shape": entry.variant.shape,
        "deviation": entry.deviation,
        "paper": paper_row(entry.table, row),
        "run_dir": f"runs/{model}/seed{seed}",
        "command": "python cli.py fit",
        "trained_size": size,
        "reference_size": {"params": 2_000_000, "gmacs": 0.018},
        "throughput_ratio": ratio,
        "throughput_batch": 64,
        "sdpa_kernel": "math",
        "device": "cpu",
        "metrics": {"frechet_inception_distance": fid},
        "eval_samples": 1000,
        "steps": 600,
        "wandb": f"wandb sync runs/{model}",
    }


def write_results(out: Path, results: list[dict]) -> None:
    for r in results:
        d = out / "proxy" / slug(r["model"]) / f"seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))


def test_report_from_every_finished_run_without_the_reference_row(tmp_path):
    """Rows written by two 'invocations' (two seeds of three rows, DiCo-S not among them) all reach the table; the
    throughput ratios, the paper's ratios, FID spreads, Spearman and the CCA claim come out right."""
    fids = {"w/o CCA": (60.0, 64.0), "CCA->SE module": (55.0, 57.0), "CM->Self-Attn": (70.0, 71.0)}
    models = {"w/o CCA": "DiCo-S-noCCA", "CCA->SE module": "DiCo-S-SE", "CM->Self-Attn": "DiCo-S-SelfAttn"}
    write_results(
        tmp_path, [fake_result("4", row, models[row], s, fids[row][s], 0.8 + 0.1 * s) for row in fids for s in (0, 1)]
    )
    rows_t3 = [fake_result("3", "DiT (iso.)", "DiT-S/2", 0, 99.0, 1.2)]
    write_results(tmp_path, rows_t3)  # another table's run in the same folder: not in Table 4
    results = status.finished_results("4", "proxy", tmp_path)
    assert len(results) == 6
    paths = report.write_report("4", "proxy", results, tmp_path / "res", "python ablations/run.py collect ...")
    rows = {r["row"]: r for r in read_csv(paths[0])}
    assert rows["w/o CCA"]["seeds"] == "2" and float(rows["w/o CCA"]["fid"]) == 62.0
    assert float(rows["w/o CCA"]["fid_spread"]) == 4.0
    assert float(rows["w/o CCA"]["throughput_ratio"]) == pytest.approx(0.85)  # median over seeds
    from dico.models.ablation import paper_row

    expected = paper_row(TABLE4, "CM->Self-Attn")["throughput"] / paper_row(TABLE4, "DiCo-S")["throughput"]
    assert float(rows["CM->Self-Attn"]["paper_throughput_ratio"]) == pytest.approx(expected, abs=1e-3)
    assert rows["DiCo-S"]["seeds"] == "0" and rows["DiCo-S"]["fid"] == ""
    md = paths[1].read_text()
    assert "(PARTIAL)" in md and "PROXY budget" in md and "Scaling rule" in md
    # Spearman of ours (62, 56, 70.5) against the paper's FIDs, by an independent rank computation
    ours = np.array([62.0, 56.0, 70.5])
    paper = np.array([float(rows[r]["paper_fid"]) for r in ("w/o CCA", "CCA->SE module", "CM->Self-Attn")])
    rank = lambda a: np.argsort(np.argsort(a))  # no ties here
    rho = np.corrcoef(rank(ours), rank(paper))[0, 1]
    assert f"over 3 rows: {rho:+.2f}" in md
    assert "wandb sync runs/DiCo-S-SE" in md and paths[2].exists()
    # the CCA contrasts need DiCo-S: no shared seeds yet; the conv-vs-attention speed claim reads our ratio
    assert "w/o CCA / DiCo-S: no shared seeds; not resolved" in md and "1 of 1 attention rows slower" in md
    assert rows["w/o CCA"]["fid_seeds"] == "0 1"  # the seed numbers, for pairing


def test_the_runner_process_waits_passively_as_cli_does():
    """The runner times rows in its own process (finalize): its OpenMP workers must sleep, not spin, when idle, or a
    shared CPU slows the timing turns many times over. Set before torch loads; the user's own setting wins."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, ablations.run; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE"]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["ACTIVE"]


def test_report_of_a_budget_scored_by_the_heldout_loss_alone(tmp_path):
    """crops16 runs carry no FID: the table shows their held-out MSE per seed and its mean, the FID stays empty."""
    results = []
    for seed, mse in ((0, 0.0412), (1, 0.0416)):
        r = fake_result("4", "DiCo-S", "DiCo-S", seed, 0.0, 1.0)
        r.update(budget="crops16", metrics={"heldout_mse": mse, "heldout_vb": 0.003, "heldout_loss": mse + 0.003})
        results.append(r)
    paths = report.write_report("4", "crops16", results, tmp_path, "python ablations/run.py collect ...")
    rows = {r["row"]: r for r in read_csv(paths[0])}
    assert rows["DiCo-S"]["fid"] == "" and float(rows["DiCo-S"]["heldout_mse"]) == pytest.approx(0.0414)
    assert rows["DiCo-S"]["heldout_mse_per_seed"] == "0.041200 0.041600"
    assert "CROPS16 budget" in paths[1].read_text() and "| 0.0414 [" in paths[1].read_text()  # geomean [95% CI]


def test_collect_draws_each_contrast_along_the_recorded_steps(tmp_path):
    """Rows with held-out scores at 8 steps (result.json's curve, as finalize records it): the table is the last
    step's, and each contrast with both rows gets its paired ratio at every step (CSV), a plot and a verdict on its
    sign over the last half; rows without a curve (one step) draw none."""
    ratios = {"w/o CCA": lambda s: 1.03, "CM->Self-Attn": lambda s: 1.09 - 0.12 * s / 800}  # crosses 1 at step 600
    models = {"DiCo-S": "DiCo-S", "w/o CCA": "DiCo-S-noCCA", "CM->Self-Attn": "DiCo-S-SelfAttn"}
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.05, 3)
    results = []
    for row, model in models.items():
        for seed in range(3):
            curve = [
                {
                    "step": s,
                    "metrics": {
                        "heldout_mse": float(
                            0.05
                            * np.exp(-s / 400 + seed_effect[seed])
                            * (ratios[row](s) if row in ratios else 1.0)
                            * np.exp(rng.normal(0, 0.002))
                        )
                    },
                }
                for s in range(100, 801, 100)
            ]
            r = fake_result("4", row, model, seed, 0.0, 1.0)
            r.update(budget="crops16", steps=800, metrics=dict(curve[-1]["metrics"]), curve=curve)
            results.append(r)
    paths = report.write_report("4", "crops16", results, tmp_path, "python ablations/run.py collect ...")
    names = [p.name for p in paths]
    assert (
        names[3:]
        == ["curves-table4-crops16.csv", "curves-table4-crops16-rows.csv", "curves-table4-crops16-heldout_mse.png"]
        and paths[-1].stat().st_size > 0
    )
    from dico.analysis.reports import read_results

    assert [t.budget for t in read_results(tmp_path)] == ["crops16"]  # the curves are not read as a table
    rows = {r["row"]: r for r in read_csv(paths[0])}
    assert float(rows["w/o CCA"]["heldout_mse_geomean"]) == pytest.approx(
        math.exp(np.mean([math.log(r["metrics"]["heldout_mse"]) for r in results if r["row"] == "w/o CCA"])), rel=1e-3
    )  # the table: the last step
    points = read_csv(paths[3])
    assert {(p["worse"], p["better"]) for p in points} == {("w/o CCA", "DiCo-S"), ("CM->Self-Attn", "DiCo-S")}
    self_attn = [p for p in points if p["worse"] == "CM->Self-Attn"]
    assert [int(p["step"]) for p in self_attn] == list(range(100, 801, 100))
    from ablations import stats

    at = {
        row: {r["seed"]: round(r["curve"][1]["metrics"]["heldout_mse"], 6) for r in results if r["row"] == row}
        for row in models
    }  # as the table writes them
    c = stats.paired_contrast("DiCo-S", at["DiCo-S"], "CM->Self-Attn", at["CM->Self-Attn"])
    assert float(self_attn[1]["ratio"]) == pytest.approx(c.ratio, rel=1e-5)
    assert float(self_attn[1]["ci_low"]) == pytest.approx(c.low, rel=1e-5)
    assert self_attn[1]["resolved"] == str(c.resolved) and self_attn[1]["paired_seed_ids"] == "0 1 2"
    table_part, md = paths[1].read_text().split("## Along the way: each contrast at every recorded step")
    [nocca] = [line for line in md.splitlines() if line.strip().startswith("- w/o CCA / DiCo-S")]
    assert "sign stable over the last half, steps 500-800 (4 steps): agrees at each" in nocca
    [nocca_table] = [line for line in table_part.splitlines() if line.strip().startswith("- w/o CCA / DiCo-S")]
    assert nocca.startswith(nocca_table + " at step 800; resolved at 8 of 8 steps (100, 200, ")  # the table's
    [attn] = [line for line in md.splitlines() if line.strip().startswith("- CM->Self-Attn / DiCo-S")]
    assert "sign NOT stable over the last half, steps 500-800 (4 steps): the ratio crosses 1" in attn
    assert "- held-out MSE of each row (geometric mean over seeds): DiCo-S 0.01" in md and " at step 400 -> " in md
    # one recorded step (an older run, or a budget without a list): no curves
    for r in results:
        r.pop("curve")
    assert len(report.write_report("4", "crops16", results, tmp_path / "one", "collect")) == 3


def test_local_runs_write_their_tables_under_their_out_unless_results_is_given(tmp_path, monkeypatch):
    """A local `collect` (or run) without --results writes under <out>/results, never over the committed tables."""
    committed = tmp_path / "committed"
    monkeypatch.setattr(run, "DEFAULT_RESULTS", committed, raising=False)  # (the committed tables: the old default)
    out = tmp_path / "runs"
    write_results(out, [fake_result("4", "DiCo-S", "DiCo-S", 0, 50.0, 1.0)])
    assert run.main(["collect", "--table", "4", "--budget", "proxy", "--out", str(out)]) == 0
    assert (out / "results" / "table4-proxy.csv").exists() and not committed.exists()
    assert (
        run.main(
            ["collect", "--table", "4", "--budget", "proxy", "--out", str(out), "--results", str(tmp_path / "mine")]
        )
        == 0
    )
    assert (tmp_path / "mine" / "table4-proxy.md").exists() and not committed.exists()


#: an absolute path of this or any machine (not inside a word like w/o, nor a URL)
MACHINE_PATH = re.compile(r"(?<![\w.:/<-])/(tmp|work|home|Users|scratch|mnt|root|private|var|data)/")


def test_reports_hold_no_machine_paths(tmp_path):
    """The committed reports name no folder of the machine that made them, and a report made from runs and commands
    with absolute paths (--out, --results, run folders, wandb folders) comes out with <out>, <results>, <path>."""
    committed = [p for p in (ROOT / "ablations" / "results").iterdir() if p.suffix in (".md", ".csv")]
    assert committed and [p.name for p in committed if MACHINE_PATH.search(p.read_text())] == []
    out = tmp_path / "abl" / "runs"
    r = fake_result("4", "DiCo-S", "DiCo-S", 0, 50.0, 1.0)
    run_dir = out / "proxy" / "dico-s" / "seed0"
    home_results = "/".join(["", "home", "me", "res"])  # not spelled out: tests/test_docs.py checks this file too
    r.update(
        run_dir=str(run_dir),
        wandb=f"wandb sync {run_dir}/wandb/offline-run-1",
        command=f"python cli.py fit --trainer.default_root_dir {run_dir}",
        launched_by=f"python ablations/run.py --table 4 --out {out} --results {home_results} --cache=/scratch/x/y",
    )
    paths = report.write_report("4", "proxy", [r], tmp_path / "res", f"python ablations/run.py collect --out {out}")
    for path in paths[:2]:
        text = path.read_text()
        assert not MACHINE_PATH.search(text) and str(tmp_path) not in text, path
    md = paths[1].read_text()
    assert "--out <out> --results <results> --cache=<cache>" in md and "collect --out <out>`" in md
    assert "(<out>/proxy/dico-s/seed0;" in md and "wandb sync <out>/proxy/dico-s/seed0/wandb/offline-run-1" in md
    assert "w/o CCA" in md  # words with a slash stay


# ------------------------------------------------------------------------------------------ ranks, status
SMOKE_CONFIG = {"trainer": {"max_steps": 4}, "fid": {"init_args": {"test_num_samples": 0}}}


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_of_a_job_measures_and_writes_the_result(tmp_path, monkeypatch, rank):
    """Every task of a SLURM job trains (one DDP group); only global rank 0 counts, times and writes result.json."""
    import submitit

    import cli

    calls, finalized = [], []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv[0]) or 0)
    monkeypatch.setattr(slurm, "resolve", lambda *a: SMOKE_CONFIG)
    monkeypatch.setattr(slurm, "finalize", lambda *a: finalized.append(a[0]))
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: type("Env", (), {"global_rank": rank})())
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_RUN_ID", "WANDB_RESUME"):  # the job sets them for its process: undo them after the test
        monkeypatch.setenv(name, "")
    row = rows_of("4", "proxy", ["DiCo-S"])[0]
    slurm.RowJob(row, tmp_path, run.parse(["--table", "4"]), [])()
    assert calls == ["fit"]  # the proxy-style budget scores at its last step: no test stage
    assert finalized == ([row] if rank == 0 else [])


def test_status_of_local_rows_not_submitted_running_interrupted_failed_and_finished(tmp_path):
    """Local runs: a live process's claim (running.json) is `running`; a claim of a process that is gone, or steps
    trained with no claim, `interrupted`; a row never started `not submitted`."""
    import socket
    import subprocess
    import sys

    names = ["DiCo-S", "GELU->ReLU", "3x3->5x5 DWC", "3x3->7x7 DWC", "w/o CCA", "CCA->SE module"]
    rows = rows_of("4", "smoke", names)
    dirs = [r.run_dir(tmp_path) for r in rows]
    for d in dirs[1:]:
        d.mkdir(parents=True)
    (dirs[1] / "csv").mkdir()
    (dirs[1] / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,9,0.5\n0,19,0.25\n")
    (dirs[2] / "failed.json").write_text(json.dumps({"stage": "fit", "log": str(dirs[2] / "run.log")}))
    (dirs[3] / "result.json").write_text(json.dumps({"metrics": {"frechet_inception_distance": 12.345}}))
    host = socket.gethostname()
    (dirs[4] / "running.json").write_text(json.dumps({"host": host, "pid": os.getpid()}))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)  # a process that has exited
    (dirs[5] / "running.json").write_text(json.dumps({"host": host, "pid": dead}))
    states = [status.row_status(r, tmp_path) for r in rows]
    assert states[0] == "not submitted"
    assert states[1] == "interrupted (step 19, loss 0.2500; the next run resumes it)"
    assert states[2] == f"failed (log: {dirs[2] / 'run.log'})"
    assert states[3] == "finished (FID 12.35)"
    assert states[4] == f"running (pid {os.getpid()} on {host})"
    assert states[5] == f"interrupted (pid {dead} on {host} is gone; the next run resumes it)"


def test_the_score_is_the_test_record_or_the_final_periodic_one(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "test" / "record.json").write_text('{"metrics": {"frechet_inception_distance": 1.0}}')
    (tmp_path / "eval" / "step_0000004.json").write_text('{"metrics": {"frechet_inception_distance": 2.0}}')
    periodic, protocol, no_fid = Budget("x", "", fid="last_step"), Budget("x", "", fid="test"), Budget("x", "")
    assert stages.score_record(tmp_path, periodic, 4)["metrics"]["frechet_inception_distance"] == 2.0
    assert stages.score_record(tmp_path, protocol, 4)["metrics"]["frechet_inception_distance"] == 1.0
    # the held-out loss (HeldOutLoss) of the last step: beside the FID, or the score alone without one
    (tmp_path / "eval" / "heldout_step_0000004.json").write_text('{"metrics": {"heldout_mse": 0.5}}')
    both = {"frechet_inception_distance": 2.0, "heldout_mse": 0.5}
    assert stages.score_record(tmp_path, periodic, 4)["metrics"] == both
    assert stages.score_record(tmp_path, no_fid, 4)["metrics"] == {"heldout_mse": 0.5}
    # the scores along the way (result.json's curve): the periodic FID and the held-out loss, merged by step
    from ablations.curves import recorded_scores

    (tmp_path / "eval" / "heldout_step_0000002.json").write_text('{"metrics": {"heldout_mse": 0.7}}')
    assert recorded_scores(tmp_path) == [
        {"step": 2, "metrics": {"heldout_mse": 0.7}},
        {"step": 4, "metrics": {"frechet_inception_distance": 2.0, "heldout_mse": 0.5}},
    ]


def test_structure_budget_counts_full_size_rows_beside_the_paper(tmp_path):
    argv = [
        "--table",
        "4",
        "--budget",
        "structure",
        "--rows",
        "DiCo-S",
        "w/o CCA",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--device",
        "cpu",
        "--throughput-batch",
        "1",
        "--throughput-turns",
        "1",
    ]
    assert run.main(argv) == 0
    rows = {r["row"]: r for r in read_csv(tmp_path / "results" / "table4-structure.csv")}
    for name in ("DiCo-S", "w/o CCA"):
        result = json.loads(
            (
                tmp_path / "runs" / "structure" / slug(ABLATION_ROWS[TABLE4, name].model) / "seed0" / "result.json"
            ).read_text()
        )
        paper = ABLATION_ROWS[TABLE4, name].paper
        assert result["trained_size"] == result["full_size"]
        assert result["full_size"]["params"] / 1e6 == pytest.approx(paper["params_M"], rel=0.01)
        assert result["full_size"]["gmacs"] == pytest.approx(paper["gflops"], rel=0.01)
        assert result["sdpa_kernel"] == "math" and "metrics" not in result
    assert float(rows["w/o CCA"]["params_ratio"]) == pytest.approx(32.99 / 33.14, abs=2e-3)
    assert rows["GELU->ReLU"]["seeds"] == "0"
    md = (tmp_path / "results" / "table4-structure.md").read_text()
    assert "(PARTIAL)" in md and "No training at this budget" in md


def test_a_row_is_trained_by_one_invocation_at_a_time(tmp_path):
    """Parallel invocations sharing a row (DiCo-S is in both tables): a live holder keeps it, a dead one does not."""
    import socket

    assert local.claim(tmp_path)
    held = json.loads((tmp_path / "running.json").read_text())
    assert held == {"host": socket.gethostname(), "pid": os.getpid()}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "running.json").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        assert not local.claim(tmp_path)
    finally:
        other.kill()
        other.wait()
    assert local.claim(tmp_path)  # the holder is gone


def test_test_samples_are_removed_once_scored_unless_kept(tmp_path):
    samples = tmp_path / "test" / "samples.npz"
    samples.parent.mkdir()
    samples.write_bytes(b"x" * 1000)
    assert stages.drop_test_samples(tmp_path, keep=True) == str(samples) and samples.exists()
    said = stages.drop_test_samples(tmp_path, keep=False)
    assert not samples.exists() and said.startswith("removed after scoring") and "--keep-test-samples" in said
    assert stages.drop_test_samples(tmp_path, keep=False) == "not saved"


def test_large_runs_inside_the_checkout_get_a_loud_note(tmp_path, capsys):
    for budget, out, loud in (
        ("paper", ROOT / "ablations" / "runs", True),
        ("paper", tmp_path, False),
        ("proxy", ROOT / "ablations" / "runs", False),
    ):
        run.warn_if_inside_checkout(out, run.parse(["--table", "4", "--budget", budget]))
        assert ("INSIDE the checkout" in capsys.readouterr().err) == loud


@pytest.mark.slow
def test_crops16_rows_get_a_patch_fid_beside_the_heldout_loss(tmp_path, capsys, monkeypatch):
    """A crops16 row is scored twice: its held-out loss at the end of fit, then a patch FID of its EMA samples
    against the training crops in the committed crop classifier's features, merged into result.json (the
    recorded FID is the saved samples' FID against the saved reference) and into the table; scoring again is a
    no-op."""
    from ablations import patch_fid
    from dico.evaluation import FeatureSpec, Featurizer, Reference, compute_metrics
    from dico.evaluation.images import load_npz

    sample = {**budget_of("crops16").patch_fid["sample"], "num_samples": 20, "batch_size": 20, "steps": 3}
    monkeypatch.setitem(budget_of("crops16").patch_fid, "sample", sample)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, results = tmp_path / "runs", tmp_path / "results"
    common = ["--table", "4", "--budget", "crops16", "--rows", "DiCo-S", "--out", str(out), "--results", str(results)]
    extra = [
        "--",
        "--trainer.max_steps",
        "3",
        "--data.init_args.train_per_image",
        "64",
        "--data.init_args.heldout_per_image",
        "8",
        "--heldout_loss.steps",
        "[1, 2]",
    ]
    assert run.main([*common, "--throughput-batch", "4", "--throughput-turns", "2", *extra]) == 0
    run_dir = out / "crops16" / "dico-s" / "seed0"
    result = json.loads((run_dir / "result.json").read_text())
    fid = result["metrics"]["frechet_inception_distance"]
    assert fid > 0 and result["metrics"]["heldout_mse"] > 0
    # the held-out loss along the way, its last step the row's score
    assert [p["step"] for p in result["curve"]] == [1, 2, 3]
    assert result["curve"][-1]["metrics"]["heldout_mse"] == result["metrics"]["heldout_mse"]
    assert {k: result["patch_fid"]["settings"][k] for k in ("num_samples", "steps", "labels", "seed")} == {
        "num_samples": 20,
        "steps": 3,
        "labels": "balanced",
        "seed": 0,
    }
    prov = result["provenance"]
    assert prov["feature_extractor"] == "dico-crops16"
    featurizer = Featurizer(FeatureSpec("dico-crops16"))  # the committed classifier
    assert prov["feature_extractor_sha256"] == featurizer.weights_sha256
    reference = Reference.load(patch_fid.reference_path(out, "crops16"))
    assert reference.meta["count"] == 640  # the rows' own training crops: 64 a class, as the composed config says
    samples, labels = load_npz(run_dir / "patch_fid" / "samples.npz")
    assert samples.shape == (20, 16, 16, 1) and labels.tolist() == [i % 10 for i in range(20)]
    again = compute_metrics(featurizer(samples), reference)["frechet_inception_distance"]
    assert again == pytest.approx(fid, rel=1e-6)
    [row] = [r for r in read_csv(results / "table4-crops16.csv") if r["row"] == "DiCo-S"]
    assert float(row["fid"]) == pytest.approx(fid, abs=0.01) and row["heldout_mse"] != ""
    assert row["feature_extractor_sha256"] == prov["feature_extractor_sha256"][:16]
    steps = [r["step"] for r in read_csv(results / "curves-table4-crops16-rows.csv") if r["score"] == "heldout_mse"]
    assert steps == ["1", "2", "3"]
    capsys.readouterr()
    assert run.main(["patch-fid", *common, *extra]) == 0
    assert "patch FID 1/" not in capsys.readouterr().out
    assert json.loads((run_dir / "result.json").read_text()) == result


def test_a_failed_patch_fid_keeps_the_row_and_names_the_fix(tmp_path, capsys):
    from ablations import patch_fid
    from dico.evaluation import Reference

    run_dir = tmp_path / "crops16" / "dico-s" / "seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    result = {"metrics": {"heldout_mse": 0.03}}
    (run_dir / "result.json").write_text(json.dumps(result))
    config = {"data": {"init_args": {"crop_size": 16, "train_per_image": 8, "heldout_per_image": 4}}}
    assert patch_fid.score_finished([run_dir], config, tmp_path, "crops16") == [run_dir]
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert "its training is kept: rerun `python ablations/run.py patch-fid" in capsys.readouterr().out
    assert Reference.load(patch_fid.reference_path(tmp_path, "crops16")).meta["count"] == 80  # the config's 8 a class
