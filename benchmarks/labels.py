"""What the class-label layout of a sample set does to FID and IS (not a test): the quickstart model on the digits.

    python cli.py fit -c experiments/quickstart.yaml            # the model (runs/quickstart/checkpoints/last.ckpt)
    python benchmarks/labels.py --seeds 8                      # 8 seeds x 2 layouts of 500 samples (docs/evaluation.md)

Each seed is one sample set of ``--samples`` samples (500: 50 a class, as FID-50K has 50 per ImageNet class) drawn
with ``uniform`` labels (random, seeded: the published ``sample_ddp.py``, dico's default) and with ``balanced``
ones (sample i has class i % 10), scored against all 1,797 digits with the ``dico-digits`` features (ADM's
conventions). The table gives mean, standard deviation and range over the seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dico.evaluation import FeatureSpec, Featurizer, SampleSet, SamplingOptions, compute_reference
from dico.evaluation.protocol import evaluate
from dico.sample_jobs import load_module

LAYOUTS = ("uniform", "balanced")


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default="runs/quickstart/checkpoints/last.ckpt")
    parser.add_argument("--classifier", default="runs/digits-classifier.pt", help="dico-digits weights")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sampler", default=None, help="default: the checkpoint's (the quickstart: DDIM)")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's (the quickstart: 50)")
    args = parser.parse_args()

    module = load_module(args.ckpt).eval()
    featurizer = Featurizer(FeatureSpec("dico-digits", args.classifier))
    reference = compute_reference("digits", featurizer)
    options = SamplingOptions(args.sampler, args.steps).resolved(module.hparams)
    print(f"{args.ckpt}: {options}, {args.samples} samples, seeds 0..{args.seeds - 1}")
    scores: dict[str, dict[str, list[float]]] = {layout: {"fid": [], "is": []} for layout in LAYOUTS}
    with torch.no_grad():
        for seed in range(args.seeds):
            for layout in LAYOUTS:
                sample_set = SampleSet(args.samples, module.model.num_classes, 250, seed, layout, options)
                metrics = evaluate(module, sample_set, reference, featurizer)["metrics"]
                scores[layout]["fid"].append(metrics["frechet_inception_distance"])
                scores[layout]["is"].append(metrics["inception_score_mean"])
            print(
                f"seed {seed}: "
                + ", ".join(f"{k} FID {v['fid'][-1]:.2f} IS {v['is'][-1]:.3f}" for k, v in scores.items()),
                flush=True,
            )
    print("\n| labels | FID mean | FID std | FID min-max | IS mean | IS std |\n| --- | --- | --- | --- | --- | --- |")
    for layout, s in scores.items():
        fid, isc = s["fid"], s["is"]
        print(
            f"| {layout} | {statistics.mean(fid):.2f} | {statistics.stdev(fid):.2f} | {min(fid):.2f}-{max(fid):.2f} "
            f"| {statistics.mean(isc):.3f} | {statistics.stdev(isc):.3f} |"
        )
    wins = sum(b < u for u, b in zip(scores["uniform"]["fid"], scores["balanced"]["fid"], strict=True))
    print(f"\nbalanced FID below uniform on {wins} of {args.seeds} seeds")


if __name__ == "__main__":
    main()
