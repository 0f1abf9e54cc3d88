"""Training-stack benchmarks (not tests): Lightning loop overhead and latent-cache read throughput.

    python benchmarks/training.py                 # both tables, CPU, a few minutes
    python benchmarks/training.py --only overhead --steps 60 --repeats 5

1. Lightning overhead: images/s of ``Trainer.fit`` against a bare PyTorch loop that runs the same
   ``DiffusionModule`` loss, AdamW step and batches (target: overhead <= 3%). Both run interleaved, several
   times, and the median is reported, since this machine is noisy.
2. LatentDataModule read throughput: latents/s served by the training DataLoader from a synthetic sharded
   cache (target: >= 20,000 latents/s on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from dico.data import LatentDataModule
from dico.data.manifest import Manifest, ShardRecord, sha256_file, shard_stem
from dico.module import DiffusionModule

MODELS = {
    "quickstart (DiCo 32, 1x8x8)": (
        "DiCo-S",
        {"hidden_size": 32, "depth": [2, 2, 2, 2, 2], "in_channels": 1, "input_size": 8, "num_classes": 10},
        128,
    ),
    "DiCo-S (4x32x32)": ("DiCo-S", {"num_classes": 10}, 8),
}


class _Timer(Callback):
    """Wall time of the steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):  # type: ignore[no-untyped-def]
        self.end = time.perf_counter()


def _batches(model_kwargs: dict, batch_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    c, s, k = model_kwargs.get("in_channels", 4), model_kwargs.get("input_size", 32), model_kwargs["num_classes"]
    g = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(batch_size, c, s, s, generator=g), "y": torch.randint(0, k, (batch_size,), generator=g)}
        for _ in range(n)
    ]


def lightning_rate(name: str, kwargs: dict, batch_size: int, steps: int, warmup: int) -> float:
    module = DiffusionModule(name, model_kwargs=kwargs)
    timer = _Timer(warmup)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
        log_every_n_steps=50,
    )
    # batch_size=None: the loader yields the prepared dicts as they are (a bare list would read as many loaders)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(kwargs, batch_size, steps), batch_size=None))
    return (steps - warmup) * batch_size / (timer.end - timer.start)


def bare_rate(name: str, kwargs: dict, batch_size: int, steps: int, warmup: int) -> float:
    module = DiffusionModule(name, model_kwargs=kwargs)
    optimizer = module.configure_optimizers()
    start = 0.0
    for i, batch in enumerate(_batches(kwargs, batch_size, steps)):
        if i == warmup:
            start = time.perf_counter()
        g = module._generator(1, 0, i, 0)
        loss = module._losses(batch, g, train=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (steps - warmup) * batch_size / (time.perf_counter() - start)


def overhead_table(steps: int, warmup: int, repeats: int) -> None:
    print(
        f"\nLightning loop vs bare PyTorch loop (same module loss, AdamW, batches; {steps - warmup} timed steps,"
        f" median of {repeats} interleaved runs)"
    )
    print(f"{'model':30} {'batch':>5} {'bare img/s':>11} {'Lightning img/s':>16} {'overhead':>9}")
    for label, (name, kwargs, batch_size) in MODELS.items():
        bare, light = [], []
        for _ in range(repeats):
            bare.append(bare_rate(name, kwargs, batch_size, steps, warmup))
            light.append(lightning_rate(name, kwargs, batch_size, steps, warmup))
        b, lt = statistics.median(bare), statistics.median(light)
        print(f"{label:30} {batch_size:>5} {b:>11.1f} {lt:>16.1f} {100 * (b / lt - 1):>8.1f}%")


def synthetic_cache(root: Path, count: int, shard_size: int, shape: tuple[int, ...] = (4, 32, 32)) -> None:
    """A cache in the layout ``dico extract`` writes, filled with random moments (no VAE needed)."""
    rng = np.random.default_rng(0)
    records = []
    for s in range(-(-count // shard_size)):
        n = min(shard_size, count - s * shard_size)
        lat, lab = root / f"{shard_stem(s)}.latents.npy", root / f"{shard_stem(s)}.labels.npy"
        moments = rng.standard_normal((n, 2, 2, *shape), dtype=np.float32)  # (K, flips, mean|std, C, H, W)
        # a posterior std is > 0: an exact 0 reads as zeroed bytes, which the reader refuses
        moments[:, :, 1] = rng.uniform(0.05, 0.5, moments[:, :, 1].shape)
        np.save(lat, moments)
        np.save(lab, rng.integers(0, 1000, n))
        records.append(ShardRecord(s, n, sha256_file(lat), sha256_file(lab), [], list(shape)))
    manifest = Manifest(
        "synthetic", 0.18215, 256, list(shape), 1000, [str(i) for i in range(1000)], 2, "float32", records
    )
    manifest.save(root)


def read_table(count: int, batch_size: int, workers: list[int], epochs: int) -> None:
    print(f"\nLatentDataModule read throughput ({count:,} cached 4x32x32 latents with flips, batch {batch_size})")
    print(f"{'workers':>7} {'latents/s':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_cache(Path(tmp), count, shard_size=4096)
        for w in workers:
            dm = LatentDataModule(tmp, batch_size=batch_size, num_workers=w, val_fraction=0.0)
            loader = dm.train_dataloader()
            n, start = 0, None
            for epoch in range(epochs + 1):
                loader.sampler.set_epoch(epoch)
                if epoch == 1:
                    start = time.perf_counter()  # epoch 0 warms the page cache and the workers
                for batch in loader:
                    n += len(batch["y"]) if epoch else 0
            print(f"{w:>7} {n / (time.perf_counter() - start):>11,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["overhead", "read"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "overhead"):
        overhead_table(args.steps, args.warmup, args.repeats)
    if args.only in (None, "read"):
        read_table(args.count, args.batch_size, args.workers, args.epochs)


if __name__ == "__main__":
    main()
