"""dico's command line: ``python cli.py <command> ...`` (installed as ``dico``).

Lightning:  fit | validate | test | predict  -c CONFIG [--section.key value ...]   (strict: unknown keys fail)
Tools:      extract      encode an image folder into a latent cache (VAE posterior mean and std)
            sample       generate an ADM-format .npz (and a PNG grid) from a checkpoint
            reference    compute and cache reference statistics (image folder, ADM .npz, or digits)
            evaluate     FID / IS / precision / recall / KID of an ADM .npz against reference statistics
            model-info   parameters, Gflops and shapes of a named model

Run ``python cli.py <command> --help`` for a command's options. This file only parses and dispatches:
the work is done by functions in ``dico/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from jsonargparse import ArgumentParser

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning(argv: list[str]) -> int:
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from dico.data import ArrayDataModule
    from dico.module import DiffusionModule

    class DicoCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
            # How samples become images is a property of the data (VAE id and scale, or pixels); the model
            # stores it in its hyper-parameters so that a checkpoint alone can sample.
            parser.link_arguments("data", "model.decoder", compute_fn=lambda dm: dm.decoder, apply_on="instantiate")

    # Configs compose (`-c base.yaml -c overlay.yaml`) and may refer to other keys of the merged result, e.g.
    # `dirpath: ${trainer.default_root_dir}/checkpoints`, so that an overlay moves a whole run with one line.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    DicoCLI(
        DiffusionModule,
        ArrayDataModule,
        subclass_mode_data=True,
        args=None if argv == sys.argv[1:] else argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
    )
    return 0


def extract(argv: list[str]) -> int:
    from dico.data.extract import ExtractConfig, extract_latents

    parser = ArgumentParser(prog="dico extract", description="Encode an image folder into a latent cache.")
    parser.add_class_arguments(ExtractConfig, as_positional=False)
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    manifest = extract_latents(ExtractConfig(**cfg.as_dict()))
    if manifest is None:
        print("[dico extract] this rank is done; other ranks still have shards to finish (rerun to resume)")
    else:
        skipped = sum(len(s.skipped) for s in manifest.shards)
        print(f"[dico extract] {manifest.count} images in {cfg.out} ({skipped} unreadable, skipped)")
    return 0


def sample(argv: list[str]) -> int:
    from dico.sampling import SampleJob, run_sample_job

    parser = ArgumentParser(prog="dico sample", description="Generate samples from a checkpoint (EMA weights).")
    parser.add_class_arguments(SampleJob, as_positional=False)
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    path = run_sample_job(SampleJob(**cfg.as_dict()))
    print(f"[dico sample] wrote {path}")
    return 0


def _add_feature_arguments(parser: ArgumentParser) -> None:
    """The feature extractor options shared by ``reference`` and ``evaluate``."""
    from dico.evaluation.fidelity import INCEPTION

    parser.add_argument("--feature_extractor", default=INCEPTION, choices=[INCEPTION, "dico-digits"])
    parser.add_argument("--weights_path", type=str | None, default=None, help="local feature-extractor weights")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")


def reference(argv: list[str]) -> int:
    from dico.evaluation.fidelity import FeatureSpec, Reference
    from dico.evaluation.protocol import compute_reference

    parser = ArgumentParser(prog="dico reference", description="Compute and cache reference statistics.")
    parser.add_argument("--source", required=True, help="image folder, ADM .npz reference batch, or 'digits'")
    parser.add_argument("--out", required=True, help="where to cache the statistics (.npz)")
    parser.add_argument("--image_size", type=int | None, default=None, help="ADM center crop of folder images")
    parser.add_argument("--max_features", type=int, default=50_000, help="features kept for precision/recall, KID")
    _add_feature_arguments(parser)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    spec = FeatureSpec(args.feature_extractor, args.weights_path)
    from pathlib import Path

    if Path(args.out).exists() and not args.overwrite:
        ref = Reference.load(args.out)
        print(f"[dico reference] {args.out} exists ({ref.meta}); reusing it (--overwrite to recompute)")
        return 0
    ref = compute_reference(args.source, spec, args.image_size, args.max_features, device=args.device)
    ref.save(args.out)
    print(f"[dico reference] {ref.meta['count']} images -> {args.out} (sha256 {ref.sha256[:12]})")
    return 0


def evaluate(argv: list[str]) -> int:
    from dico.evaluation.fidelity import FeatureSpec, Reference
    from dico.evaluation.protocol import score_npz, write_record

    parser = ArgumentParser(prog="dico evaluate", description="Score an ADM-format sample file.")
    parser.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC)")
    parser.add_argument("--reference", required=True, help="statistics from `dico reference`")
    parser.add_argument("--out", type=str | None, default=None, help="write the JSON record here")
    _add_feature_arguments(parser)
    args = parser.parse_args(argv)
    record = score_npz(args.samples, Reference.load(args.reference),
                       FeatureSpec(args.feature_extractor, args.weights_path), args.device)  # fmt: skip
    if args.out:
        write_record(args.out, record)
    print(json.dumps(record["metrics"], indent=1))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_info(argv: list[str]) -> int:
    from dico.models import list_models
    from dico.profiling import model_info as info

    parser = ArgumentParser(prog="dico model-info", description="Parameters, Gflops (MACs) and shapes of a model.")
    parser.add_argument("--model", required=True, choices=list_models(), help="registered model name")
    parser.add_argument("--image_size", type=int, default=256, choices=[256, 512], help="image resolution")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = info(args.model, image_size=args.image_size)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")
    return 0


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "extract": extract,
    "sample": sample,
    "reference": reference,
    "evaluate": evaluate,
    "model-info": model_info,
}


def normalize_options(argv: list[str]) -> list[str]:
    """Tools accept ``--image-size`` and ``--image_size`` alike."""
    out = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = "--" + name[2:].replace("-", "_") + eq + value
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        return lightning(argv)
    if command in TOOLS:
        return TOOLS[command](normalize_options(rest))
    print(f"unknown command {command!r}; choose one of: {', '.join((*LIGHTNING_COMMANDS, *TOOLS))}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
