"""Evaluation benchmarks (not tests): sampling overhead and the cost of one periodic evaluation.

    python benchmarks/evaluation.py                       # CPU, a few minutes
    python benchmarks/evaluation.py --samples 1000 --steps 250

1. Guided 250-step iDDPM sampling (``dico.diffusion.generate``) against the bare model calls it makes -- the
   same doubled batch, the same number of forwards -- on the same model and batch: the sampler's own overhead
   (target <= 5%). Median of interleaved repetitions.
2. One periodic evaluation at M samples (the FID callback's work: sampling with guidance, features, metrics)
   with a small model on the digits, on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dico.diffusion import generate, sampling_diffusion
from dico.evaluation import FeatureSpec, Featurizer, SampleSet, SamplingOptions, compute_reference
from dico.evaluation.protocol import evaluate
from dico.models import create_model
from dico.module import DiffusionModule

QUICKSTART_MODEL = {"hidden_size": 32, "depth": [2, 2, 2, 2, 2], "in_channels": 1, "input_size": 8, "num_classes": 10}


def sampling_overhead(batch: int, steps: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = create_model("DiCo-S", **QUICKSTART_MODEL).eval()
    labels = torch.arange(batch) % 10
    shape = (1, 8, 8)
    diffusion = sampling_diffusion("iddpm", steps)

    def sampler() -> float:
        start = time.perf_counter()
        generate(model, labels, shape, model.null_label, steps=steps, cfg_scale=4.0, diffusion=diffusion)
        return time.perf_counter() - start

    x = torch.randn(2 * batch, *shape)
    y2 = torch.cat([labels, torch.full_like(labels, model.null_label)])

    @torch.no_grad()
    def bare() -> float:
        start = time.perf_counter()
        for i in range(steps):
            model(x, torch.full((2 * batch,), i * (1000 // steps)), y2)
        return time.perf_counter() - start

    sampler(), bare()  # warm-up
    s, b = [], []
    for _ in range(repeats):
        s.append(sampler())
        b.append(bare())
    ms, mb = statistics.median(s), statistics.median(b)
    print(
        f"\nGuided {steps}-step iDDPM sampling vs the bare model calls (quickstart DiCo, batch {batch}, "
        f"doubled for guidance; median of {repeats})"
    )
    print(
        f"{'':24} {'samples/s':>10}\n{'bare model calls':24} {batch / mb:>10.1f}\n{'generate()':24} "
        f"{batch / ms:>10.1f}\n{'sampler overhead':24} {100 * (ms / mb - 1):>9.1f}%"
    )


def periodic_evaluation(samples: int, steps: int) -> None:
    torch.manual_seed(0)
    module = DiffusionModule(
        "DiCo-S", model_kwargs=QUICKSTART_MODEL, cfg_scale=2.0, guidance_mode="all", clip_denoised=True
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        featurizer = Featurizer(FeatureSpec("dico-digits", str(Path(tmp) / "classifier.pt")))
        reference = compute_reference("digits", featurizer)
        sample_set = SampleSet(samples, 10, batch_size=250, options=SamplingOptions(steps=steps))
        start = time.perf_counter()
        record = evaluate(module, sample_set, reference, featurizer)
        elapsed = time.perf_counter() - start
    print(
        f"\nOne periodic evaluation: M = {samples} guided samples, {steps}-step iDDPM, quickstart DiCo, "
        "digits features (CPU)"
    )
    print(
        f"{'seconds':>10} {'samples/s':>10} {'FID':>8}\n{elapsed:>10.1f} {samples / elapsed:>10.1f} "
        f"{record['metrics']['frechet_inception_distance']:>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--only", choices=["overhead", "periodic"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "overhead"):
        sampling_overhead(args.batch, args.steps, args.repeats)
    if args.only in (None, "periodic"):
        periodic_evaluation(args.samples, args.steps)


if __name__ == "__main__":
    main()
