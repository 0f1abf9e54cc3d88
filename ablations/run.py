"""Reproduce the paper's ablation Tables 3 and 4 as scripted, resumable experiments.

    python ablations/run.py --table 4 --budget structure                    # counts + throughput, CPU, minutes
    python ablations/run.py --table 3 --budget smoke --data DIR             # tiny models, a few steps each
    python ablations/run.py --table 4 --budget paper --data data/imagenet256-latents \
        --reference data/imagenet256-reference.npz --inception-weights data/weights-inception-2015-12-05-6726825d.pth

Every row is a registered model (``dico/models/ablation.py``). ``structure`` measures #params, Gflops and
forward throughput of the full-size variants; the training budgets train each row with the training stack
(EMA, checkpoints, wandb group per table) and score it with the evaluation protocol (FID-50K at ``paper``, fewer
samples below it: the report says how many). A finished row (``result.json``) is skipped; an interrupted one
resumes from its ``last.ckpt``. Results land in ``ablations/results/table{3,4}-<budget>.{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from ablations.report import write_report  # noqa: E402
from dico.models import create_model  # noqa: E402
from dico.models.ablation import ABLATION_ROWS, TABLE3, TABLE4, AblationRow  # noqa: E402
from dico.profiling import count_macs, count_parameters  # noqa: E402

TABLES = {"3": TABLE3, "4": TABLE4}


@dataclass(frozen=True)
class Budget:
    """How much each row gets. ``global_batch`` is split over devices; ``eval_samples`` feed FID/IS/P/R."""

    train: bool
    tiny: bool = False
    max_steps: int = 0
    global_batch: int = 256
    eval_samples: int = 0
    sampling_steps: int = 250
    checkpoint_every: int = 5000
    ema_decay: float = 0.9999
    throughput_batch: int = 64
    throughput_iters: int = 10


BUDGETS = {
    "structure": Budget(train=False),
    "smoke": Budget(train=True, tiny=True, max_steps=20, global_batch=8, eval_samples=32, sampling_steps=10,
                    checkpoint_every=10, ema_decay=0.9, throughput_batch=8, throughput_iters=2),
    "short": Budget(train=True, max_steps=50_000, eval_samples=10_000),
    "paper": Budget(train=True, max_steps=400_000, eval_samples=50_000),
}  # fmt: skip


def slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", row).strip("-").lower()


def rows_of(table: str, names: list[str] | None) -> list[AblationRow]:
    rows = [r for (t, _), r in ABLATION_ROWS.items() if t == TABLES[table]]
    if names:
        unknown = set(names) - {r.row for r in rows}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; table {table} has {[r.row for r in rows]}")
        rows = [r for r in rows if r.row in names]
    return rows


@torch.no_grad()
def forward_throughput(model: torch.nn.Module, batch: int, iters: int, device: torch.device) -> float:
    """Images/s of one fp32 forward at ``batch`` on ``device`` (the paper: A100, batch 64)."""
    model = model.to(device).eval()
    c, s = model.in_channels, model.input_size
    x = torch.randn(batch, c, s, s, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    model(x, t, y)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        model(x, t, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def structure(row: AblationRow, budget: Budget, device: torch.device) -> dict[str, Any]:
    model = create_model(row.model)
    return {
        "params": count_parameters(model),
        "gmacs": count_macs(model, 32) / 1e9,
        "throughput": forward_throughput(model, budget.throughput_batch, budget.throughput_iters, device),
        "throughput_batch": budget.throughput_batch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def train_and_evaluate(row: AblationRow, budget: Budget, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Fit the row's variant on the latent cache, then run the sample-based test protocol; returns its metrics."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from dico.callbacks import EMA, FIDEvaluation, PreemptionCheckpoint, Throughput
    from dico.data import LatentDataModule
    from dico.loggers import AutoWandbLogger
    from dico.module import DiffusionModule

    devices = args.devices
    per_device = max(1, budget.global_batch // devices)
    data = LatentDataModule(args.data, batch_size=per_device, num_workers=args.num_workers, val_fraction=0.001)
    c, h, _ = data.sample_shape
    overrides = {**(row.tiny_overrides() if budget.tiny else {}), "in_channels": c, "input_size": h,
                 "num_classes": data.num_classes}  # fmt: skip
    module = DiffusionModule(row.model, model_kwargs=overrides, sampling_steps=budget.sampling_steps, cfg_scale=1.0,
                             decoder=data.decoder)  # fmt: skip
    fid = FIDEvaluation(
        reference=args.reference, reference_source=args.reference_source, weights_path=args.inception_weights,
        reference_image_size=data.data.manifest.image_size,
        every_n_steps=0, num_samples=budget.eval_samples, test_num_samples=budget.eval_samples,
        test_steps=budget.sampling_steps,
        batch_size=min(125, budget.eval_samples), test_save_samples=False,
    )  # fmt: skip
    loggers: list[Any] = [CSVLogger(run_dir, name="csv", version="")]
    if "wandb" in args.loggers:
        group = f"table{args.table}-{args.budget}"
        loggers.append(AutoWandbLogger(project="dico-ablations", name=f"{group}-{slug(row.row)}", group=group,
                                       save_dir=str(run_dir)))  # fmt: skip
    trainer = Trainer(
        accelerator=args.accelerator, devices=devices, strategy="auto" if devices == 1 else "ddp",
        max_steps=budget.max_steps, default_root_dir=run_dir, logger=loggers, enable_progress_bar=args.progress,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=min(50, budget.max_steps),
        callbacks=[
            EMA(decay=budget.ema_decay),
            ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=budget.checkpoint_every,
                            save_last=True, save_top_k=0),
            PreemptionCheckpoint(), Throughput(), fid,
        ],
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, data, ckpt_path=str(last) if last.exists() else None)
    trainer.test(module, data, verbose=False)
    record = json.loads((run_dir / "test" / "record.json").read_text())
    return {"metrics": record["metrics"], "eval_samples": budget.eval_samples, "steps": trainer.global_step,
            "model_kwargs": overrides, "reference_sha256": record["reference_sha256"]}  # fmt: skip


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    budget = BUDGETS[args.budget]
    if args.throughput_batch or args.throughput_iters:  # e.g. a quick look on a CPU
        budget = replace(budget, throughput_batch=args.throughput_batch or budget.throughput_batch,
                         throughput_iters=args.throughput_iters or budget.throughput_iters)  # fmt: skip
    if budget.train and not args.data:
        raise SystemExit(f"--budget {args.budget} trains: give the latent cache with --data DIR (`dico extract`)")
    if budget.train and not args.reference:
        raise SystemExit("training budgets are scored against reference statistics: --reference REF.npz")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = []
    for row in rows_of(args.table, args.rows):
        run_dir = Path(args.out) / f"table{args.table}" / args.budget / slug(row.row)
        done = run_dir / "result.json"
        if done.exists():
            print(f"[ablations] {row.row}: finished earlier ({done})")
            results.append(json.loads(done.read_text()))
            continue
        print(f"[ablations] {row.row} ({row.model}) ...")
        result: dict[str, Any] = {"table": args.table, "row": row.row, "model": row.model, "budget": args.budget,
                                  "note": row.note, "deviation": row.deviation, "paper": row.paper,
                                  "budget_settings": asdict(budget)}  # fmt: skip
        result.update(structure(row, budget, device))
        if budget.train:
            result.update(train_and_evaluate(row, budget, args, run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=1, default=str))
        results.append(result)
    paths = write_report(results, Path(args.results), f"table{args.table}-{args.budget}")
    print("[ablations] wrote " + ", ".join(str(p) for p in paths))
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=sorted(TABLES), required=True)
    p.add_argument("--rows", nargs="+", help="paper row names (default: every row of the table)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="structure")
    p.add_argument("--data", help="latent cache (dico extract) for the training budgets")
    p.add_argument("--reference", help="reference statistics (dico reference) for FID/IS/precision/recall")
    p.add_argument("--reference-source", help="compute --reference from this image folder / ADM npz if missing")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception weights (needed offline)")
    p.add_argument("--out", default=str(ROOT / "ablations" / "runs"), help="per-row run folders")
    p.add_argument("--results", default=str(ROOT / "ablations" / "results"), help="tables and plots")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--device", help="device of the structure throughput (default: cuda if available)")
    p.add_argument("--throughput-batch", type=int, help="batch of the throughput measurement (default: the budget's)")
    p.add_argument("--throughput-iters", type=int, help="timed forwards of the throughput measurement")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--loggers", nargs="+", default=["csv", "wandb"], choices=["csv", "wandb"])
    p.add_argument("--progress", action="store_true", help="show Lightning progress bars")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse())
