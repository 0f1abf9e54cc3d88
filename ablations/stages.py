"""One row's stages and record: the ``cli.py`` commands it runs (as its budget says: :mod:`ablations.budgets`), the
score read back from what they wrote, and ``result.json`` (counts, throughput ratio, score, provenance) written by
rank 0 at the end. Shared by the local launcher (:mod:`ablations.local`) and the SLURM job (:mod:`ablations.slurm`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ablations.budgets import Budget, budget_of
from ablations.rows import Row

REFERENCE_MODEL = "DiCo-S"  # both tables' throughput reference


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def checkpoint_step(run_dir: Path) -> int | None:
    """The global step of the row's ``last.ckpt`` (None without one)."""
    from dico.checkpoints import read_checkpoint

    path = last_checkpoint(run_dir)
    if not path.exists():
        return None
    return int(read_checkpoint(path)["global_step"])


def wandb_env(row: Row, out: Path) -> dict[str, str]:
    """One wandb run per row across fit, test and requeues: a fixed run id resumed by each stage."""
    digest = hashlib.sha1(str(row.run_dir(out).resolve()).encode()).hexdigest()[:8]
    return {"WANDB_RUN_ID": f"{row.key.replace('/', '-')}-{digest}", "WANDB_RESUME": "allow"}


def stages(row: Row, out: Path, extra: list[str]) -> list[list[str]]:
    """The ``cli.py`` argument lists of a row: none at a budget without training; fit (resuming when a
    ``last.ckpt`` exists), then test when the budget's FID is the test protocol's (``fid="test"``; a ``"last_step"``
    FID and the held-out loss are written by fit itself). The patch FID follows the finished rows
    (:mod:`ablations.patch_fid`)."""
    budget = budget_of(row.budget)
    if not budget.trains:
        return []
    last = last_checkpoint(row.run_dir(out))
    resume = ["--ckpt_path", str(last)] if last.exists() else []
    fit = ["fit", *row.cli_args(out, extra), *resume]
    if budget.fid == "test":
        return [fit, ["test", *row.cli_args(out, extra), "--ckpt_path", str(last)]]
    return [fit]


def score_record(run_dir: Path, budget: Budget, step: int) -> dict[str, Any]:
    """The row's evaluation record after ``step`` training steps, as its budget scores: the test protocol's
    (``fid="test"``), or the last periodic one (``eval/step_<step>``); with the held-out loss (``HeldOutLoss``) of
    the last step in its metrics, or alone without an FID."""
    heldout = run_dir / "eval" / f"heldout_step_{step:07d}.json"
    if budget.fid is None:
        return json.loads(heldout.read_text())
    if budget.fid == "test":
        record = json.loads((run_dir / "test" / "record.json").read_text())
    else:
        record = json.loads((run_dir / "eval" / f"step_{step:07d}.json").read_text())
    if heldout.exists():
        record["metrics"].update(json.loads(heldout.read_text())["metrics"])
    return record


def stage_lines(rows: list[Row], out: Path, extra: list[str]) -> list[str]:
    """Each row's commands (``--dry-run``)."""
    return [f"python cli.py {' '.join(stage)}" for row in rows for stage in stages(row, out, extra)]


def finalize(row: Row, out: Path, config: dict[str, Any], args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Rank 0, after training: counts, the interleaved throughput ratio, the test record -> ``result.json``."""
    import torch
    import yaml

    from ablations.curves import recorded_scores
    from ablations.measure import counts, machine, throughput_ratio
    from ablations.provenance import provenance
    from dico.models.ablation import VARIANTS

    run_dir = row.run_dir(out)
    budget = budget_of(row.budget)
    model, kwargs = config["model"]["model"], dict(config["model"].get("model_kwargs") or {})
    # the reference (DiCo-S) at the row's size: its own overlay for this budget
    reference_overlay = Row(row.table, "DiCo-S", REFERENCE_MODEL, row.budget).overlay()
    reference_kwargs = yaml.safe_load(reference_overlay.read_text())["model"].get("model_kwargs") or {}
    batch = args.throughput_batch or budget.throughput[0]
    turns = args.throughput_turns or budget.throughput[1]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entry = row.entry
    result: dict[str, Any] = {
        "table": row.table,
        "row": row.row,
        "model": model,
        "budget": row.budget,
        "seed": row.seed,
        "model_kwargs": kwargs,
        "note": entry.note,
        "shape": VARIANTS[model].shape,
        "deviation": entry.deviation,
        "paper": entry.paper,
        "run_dir": str(run_dir),
        "command": "python cli.py fit " + " ".join(row.cli_args(out, extra)),
        "full_size": counts(model, {}),
        "trained_size": counts(model, kwargs),
        "reference_size": counts(REFERENCE_MODEL, reference_kwargs),
        "launched_by": getattr(args, "command_line", ""),
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    result.update(
        throughput_ratio(
            model,
            kwargs,
            REFERENCE_MODEL,
            reference_kwargs,
            batch=batch,
            turns=turns,
            device=device,
            sdpa=args.sdpa_kernel,
            seed=row.seed,
        )
    )
    record = None
    if budget.trains:
        record = score_record(run_dir, budget, config["trainer"]["max_steps"])
        steps = checkpoint_step(run_dir)
        result.update(
            metrics=record["metrics"],
            eval=record["settings"],
            steps=steps,
            eval_samples=record["settings"]["num_samples"],
            feature_extractor=record["feature_extractor"],
        )
        result["curve"] = recorded_scores(run_dir)  # the scores along the way (ablations.curves)
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
