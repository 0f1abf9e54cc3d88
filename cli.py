"""dico's command line: ``python cli.py <command> ...`` (installed as ``dico``).

Lightning:  fit | validate | test | predict  -c CONFIG [--section.key value ...]   (strict: unknown keys fail)
Tools:      extract      encode an image folder into a latent cache (VAE posterior mean and std)
            sample       generate an ADM-format .npz (and a PNG grid) from a checkpoint or a released model
            reference    compute and cache reference statistics (image folder, ADM .npz, or digits)
            evaluate     FID / IS / precision / recall / KID of an ADM .npz against reference statistics
            model-info   parameters, Gflops and shapes of a named model or of a checkpoint

Run ``python cli.py <command> --help`` for a command's options. This file only parses and dispatches:
the work is done by functions in ``dico/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Options are taken whole: argparse's prefix matching would read `sample --cfg 2` as --cfg_scale 2.
PARSER_KWARGS = {"allow_abbrev": False}


def tool_parser(command: str, description: str) -> ArgumentParser:
    """The parser of the tool ``dico COMMAND``."""
    return ArgumentParser(prog=f"dico {command}", description=description, **PARSER_KWARGS)


def lightning(argv: list[str]) -> int:
    """LightningCLI with dico's defaults (:func:`build_lightning_cli`) and exit status ``PREEMPTED_EXIT_CODE`` (75)
    after a SIGTERM so that requeue loops rerun."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dico.callbacks.preemption import PREEMPTED_EXIT_CODE
    from dico.loggers import finish_wandb_run, open_wandb_run

    users_run = open_wandb_run()  # a run opened before this command is not ours to end
    status = 1  # an exception on the way out marks the wandb run failed
    try:
        build_lightning_cli(argv)
        status = 0
    except SIGTERMException:
        print(f"[dico] preempted (SIGTERM); exit status {PREEMPTED_EXIT_CODE}: rerun with --ckpt_path last to resume")
        status = PREEMPTED_EXIT_CODE
    finally:
        finish_wandb_run(status, keep=users_run)
    return status


def build_lightning_cli(argv: list[str], run: bool = True, instantiate: bool = True):  # type: ignore[no-untyped-def]
    """The LightningCLI of ``fit``/``validate``/``test``/``predict``: atomic checkpoint files (``trainer.plugins``)
    and a CSV logger that keeps its history on resume. ``run=False`` only parses ``argv`` (without the subcommand)
    and instantiates the model, data and trainer, as a check that a composed config builds; ``instantiate=False``
    (with ``run=False``) only parses: nothing is built or seeded (:func:`compose_lightning_config`)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    import dico.callbacks.named as named_callbacks
    from dico.data import ArrayDataModule
    from dico.loggers import LoggedConfig, set_wandb_job_type
    from dico.module import DiffusionModule
    from dico.trainer import Trainer

    csv_loggers = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")
    named_callbacks.refuse_former_settings(argv)

    class DicoCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
            # How samples become images is a property of the data (VAE id and scale, or pixels); the model
            # stores it in its hyper-parameters so that a checkpoint alone can sample.
            parser.link_arguments("data", "model.decoder", compute_fn=lambda dm: dm.decoder, apply_on="instantiate")
            parser.set_defaults({"trainer.plugins": [{"class_path": "dico.checkpoints.AtomicCheckpointIO"}]})
            # Every callback under a key of its own (--fid.num_samples 200; --fid null: off), see docs/callbacks.md
            for key, callback in named_callbacks.CALLBACKS.items():
                parser.add_subclass_arguments(callback, key, required=False, fail_untyped=False)
            parser.set_defaults(named_callbacks.parser_defaults())
            parser.default_config_files = [str(Path(named_callbacks.__file__).with_name(named_callbacks.SETTINGS_FILE))]

        def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
            # Lightning reads --ckpt_path's hyper-parameters right after parsing: a truncated or foreign file is
            # named as such first
            super().parse_arguments(parser, args)
            from dico.checkpoints import read_checkpoint

            path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
            if path and Path(path).is_file():
                read_checkpoint(path)

        def before_test(self) -> None:
            # `test --ckpt_path` also takes a released checkpoint (any published format): its weights go into
            # the configured model, as --model.pretrained would put them.
            from dico.checkpoints import released_ckpt_path_to_model

            config = self.config_init[self.subcommand]
            config["ckpt_path"] = released_ckpt_path_to_model(self.model, config.get("ckpt_path"))

        def after_test(self) -> None:
            from dico.evaluation.published import comparison, release_of_test

            record_path = Path(self.trainer.default_root_dir) / "test" / "record.json"
            release = release_of_test(self.trainer, self.model)
            if release is not None and record_path.is_file():
                compared = comparison(release, json.loads(record_path.read_text()))
                if compared:
                    print(f"[dico test] {compared['line']}")

        def instantiate_trainer(self, **kwargs):  # type: ignore[no-untyped-def]
            # trainer.callbacks (further callbacks), then the named ones that are on
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            listed = config["trainer"].get("callbacks") or []
            named = [config[key] for key in named_callbacks.CALLBACKS if config[key] is not None]
            callbacks = [*(listed if isinstance(listed, list) else [listed]), *named]
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.trainer.logger in (False, []):  # no logger to report learning rates to
                config.lr_monitor = None
            loggers = config.trainer.logger
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                if getattr(logger, "class_path", None) in csv_loggers:
                    logger.class_path = "dico.loggers.CSVLogger"  # same arguments; appends on resume
            set_wandb_job_type(loggers, self.subcommand)  # validate/test: runs grouped with the fit run

    # Configs compose (`-c base.yaml -c overlay.yaml`) and may refer to other keys of the merged result, e.g.
    # `dirpath: ${trainer.default_root_dir}/checkpoints`, so that an overlay moves a whole run with one line.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    class ComposeOnly(DicoCLI):
        def _set_seed(self) -> None:  # no seed_everything in a process that only reads the config
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    return (DicoCLI if instantiate else ComposeOnly)(
        DiffusionModule,
        ArrayDataModule,
        subclass_mode_data=True,
        trainer_class=Trainer,  # `--trainer.limit_val_batches 1` is one batch, not 100%
        args=None if argv == sys.argv[1:] else argv,
        save_config_callback=LoggedConfig,  # config.yaml, and the whole config in the wandb run
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+", **PARSER_KWARGS},
        run=run,
    )


def compose_lightning_config(argv: list[str]) -> dict[str, Any]:
    """The config of ``python cli.py fit ARGV`` as ``--print_config`` prints it (configs merged, interpolations
    resolved), composed by the same parser in this process: nothing is built, seeded or run."""
    import warnings

    import yaml

    with warnings.catch_warnings():  # a caller's own command line (sys.argv) is not what is parsed here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        composed = build_lightning_cli(argv, run=False, instantiate=False)
    return yaml.safe_load(composed.parser.dump(composed.config, skip_none=False))


def extract(argv: list[str]) -> int:
    from dico.data.extract import ExtractConfig, extract_latents

    parser = tool_parser("extract", "Encode an image folder into a latent cache.")
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
    from dico.sample_jobs import SampleJob, run_sample_job

    parser = tool_parser("sample", "Generate samples from a checkpoint (EMA weights).")
    parser.add_class_arguments(SampleJob, as_positional=False)
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    path = run_sample_job(SampleJob(**cfg.as_dict()))
    print(f"[dico sample] wrote {path}")
    return 0


def _add_feature_arguments(parser: ArgumentParser, extractor: str | None) -> None:
    """The feature extractor options shared by ``reference`` and ``evaluate``; ``extractor`` None: by default the one
    the reference was made with."""
    from dico.evaluation.fidelity import FEATURE_EXTRACTORS

    said = "default: the one the reference was made with" if extractor is None else None
    parser.add_argument("--feature_extractor", default=extractor, choices=list(FEATURE_EXTRACTORS), help=said)
    parser.add_argument("--weights_path", type=str | None, default=None, help="local feature-extractor weights")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--batch_size", type=int, default=100, help="images per feature-extractor batch")


def reference(argv: list[str]) -> int:
    from pathlib import Path

    from dico.evaluation.fidelity import INCEPTION, FeatureSpec, Featurizer
    from dico.evaluation.reference import Reference, check_source, compute_reference

    parser = tool_parser("reference", "Compute and cache reference statistics.")
    parser.add_argument("--source", required=True, help="ADM .npz reference batch, image folder, or 'digits'")
    parser.add_argument("--out", required=True, help="where to cache the statistics (.npz)")
    parser.add_argument("--image_size", type=int | None, default=None, help="ADM center crop of folder images")
    parser.add_argument("--max_features", type=int, default=50_000, help="features kept for precision/recall, KID")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset of kept features")
    _add_feature_arguments(parser, INCEPTION)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_source(args.source, args.image_size)  # before the extractor is built (or trained and saved)
    existing = Reference.load(args.out) if Path(args.out).exists() and not args.overwrite else None
    fix = f"recompute it with --overwrite, or write these statistics to another --out than {args.out}"
    if existing is not None:  # the same source, extractor name and crop before the extractor is built ...
        existing.check_made_by(args.source, {"feature_extractor": args.feature_extractor}, args.image_size, fix)
    featurizer = Featurizer(FeatureSpec(args.feature_extractor, args.weights_path), args.device)
    if existing is not None:  # ... and the same weights
        existing.check_made_by(args.source, featurizer.identity, args.image_size, fix)
        print(
            f"[dico reference] {args.out} exists, made from {args.source} with the same extractor; reusing it "
            "(--overwrite to recompute)"
        )
        return 0
    ref = compute_reference(args.source, featurizer, args.image_size, args.max_features, args.seed, args.batch_size)
    ref.save(args.out)
    print(
        f"[dico reference] {ref.meta['count']} images -> {args.out} ({ref.meta['statistics']}; sha256 "
        f"{ref.sha256[:12]})"
    )
    return 0


def evaluate(argv: list[str]) -> int:
    from dico.evaluation.fidelity import CONVENTIONS, INCEPTION, FeatureSpec, Featurizer, MetricOptions
    from dico.evaluation.protocol import score_npz, write_record
    from dico.evaluation.published import comparison, release_of_samples
    from dico.evaluation.reference import Reference

    parser = tool_parser("evaluate", "Score an ADM-format sample file.")
    parser.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC)")
    parser.add_argument("--reference", required=True, help="statistics from `dico reference`")
    parser.add_argument("--out", type=str | None, default=None, help="write the JSON record here")
    parser.add_argument(
        "--pretrained",
        type=str | None,
        default=None,
        help="release to compare with (default: the one named by samples.json beside the samples)",
    )
    parser.add_argument("--convention", default="adm", choices=list(CONVENTIONS), help="IS splits, P/R distances")
    _add_feature_arguments(parser, None)
    args = parser.parse_args(argv)
    reference = Reference.load(args.reference)
    extractor = args.feature_extractor or reference.meta.get("feature_extractor", INCEPTION)
    featurizer = Featurizer(FeatureSpec(extractor, args.weights_path), args.device)
    record = score_npz(args.samples, reference, featurizer, MetricOptions(args.convention), args.batch_size)
    compared = comparison(release_of_samples(record, args.pretrained), record)
    if compared:
        record["published_comparison"] = compared
    if args.out:
        write_record(args.out, record)
    print(json.dumps(record["metrics"], indent=1))
    if "spatial_frechet_inception_distance" not in record["metrics"]:
        print(f"[dico evaluate] the reference's statistics: {reference.meta['statistics']}")
    if compared:
        print(f"[dico evaluate] {compared['line']}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_info(argv: list[str]) -> int:
    from dico.models import list_models
    from dico.models.info import model_info as info

    parser = tool_parser("model-info", "Parameters, Gflops (MACs) and shapes of a model.")
    parser.add_argument(
        "--model",
        type=str | None,
        default=None,
        choices=[*list_models(), None],
        help="registered model name (or the architecture of --ckpt/--pretrained)",
    )
    parser.add_argument("--ckpt", type=str | None, default=None, help="a checkpoint file, any published format")
    parser.add_argument("--pretrained", type=str | None, default=None, help="a release name (hub cache)")
    parser.add_argument("--model_kwargs", type=dict | None, default=None, help="architecture overrides")
    parser.add_argument("--image_size", type=int | None, default=None, help="image resolution (default 256)")
    parser.add_argument("--use_ema", type=bool, default=True, help="EMA weights of a training checkpoint")
    parser.add_argument(
        "--unsafe_full_unpickle",
        type=bool,
        default=False,
        help="unpickle --ckpt fully (can run arbitrary code): only for files you trust",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.ckpt or args.pretrained:
        from dico.checkpoints import checkpoint_info

        result = checkpoint_info(
            args.ckpt or args.pretrained,
            args.model,
            args.model_kwargs,
            args.image_size,
            args.use_ema,
            args.unsafe_full_unpickle,
        )
    elif args.model:
        result = info(args.model, image_size=args.image_size or 256, **(args.model_kwargs or {}))
    else:
        parser.error("give --model NAME, --ckpt PATH or --pretrained NAME")
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
    from dico.runtime import configure_cpu_threads

    configure_cpu_threads()  # before torch loads: passive OpenMP waiting, threads = usable CPUs (user env wins)
    if command in LIGHTNING_COMMANDS:
        return lightning(argv)
    if command in TOOLS:
        from dico.pretrained import WeightsNotFoundError

        try:
            return TOOLS[command](normalize_options(rest))
        except WeightsNotFoundError as e:  # a released checkpoint is not here: the message says how to get it
            print(f"[dico {command}] error: {e}", file=sys.stderr)
            return 1
    print(f"unknown command {command!r}; choose one of: {', '.join((*LIGHTNING_COMMANDS, *TOOLS))}", file=sys.stderr)
    return 2


# Errors from user input (an option, a file, a config value): their messages name the fix, so the command line
# prints them as one line; anything else keeps its traceback.
USER_ERRORS = (ValueError, LookupError, OSError, EOFError)


def entry(argv: list[str] | None = None) -> int:
    """The ``dico`` command (and ``python cli.py``): :func:`main`, with an error from user input printed as one line
    that names the fix, exit status 1 (``DICO_TRACEBACK=1`` shows its traceback instead)."""
    from dico.runtime import show_traceback

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except USER_ERRORS as e:
        if show_traceback():
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        command = argv[0] if argv else "dico"
        print(f"[dico {command}] error: {message} (DICO_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(entry())
