"""Command line: dispatch, model-info, strict argument checking."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import cli
from dico.callbacks.named import CALLBACKS
from tests.conftest import QUICKSTART, ROOT


def test_model_info_json(capsys, paper):
    assert cli.main(["model-info", "--model", "DiCo-S", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == paper["exact_param_counts_of_published_models"]["DiCo-S"]
    assert info["gmacs"] == pytest.approx(paper["exact_gmacs_of_published_models_32x32x4"]["DiCo-S"], rel=1e-3)
    assert info["input_shape"] == [4, 32, 32] and info["output_shape"] == [8, 32, 32]
    # the quickstart's pixel-space model: model_kwargs' input_size is the model's, not derived from --image_size
    kwargs = '{"hidden_size": 32, "depth": [2, 2, 2, 2, 2], "in_channels": 1, "input_size": 8, "num_classes": 10}'
    assert cli.main(["model-info", "--model", "DiCo-S", "--model_kwargs", kwargs, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [1, 8, 8] and info["output_shape"] == [2, 8, 8] and info["num_classes"] == 10


def test_model_info_of_a_checkpoint_gives_the_image_size_of_pixels_or_latents(tmp_path, capsys):
    """The quickstart's 8x8 pixel model makes 8x8 images; a model of 8x8 VAE latents makes 64x64 ones."""
    import torch

    from dico.module import DiffusionModule
    from tests.conftest import TINY_MODEL

    sizes = {}
    for kind, decoder in {
        "pixels": {"kind": "pixels"},
        "vae": {"kind": "vae", "vae": "org/vae", "scale_factor": 0.2},
    }.items():
        module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, decoder=decoder)
        path = tmp_path / f"{kind}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
        assert cli.main(["model-info", "--ckpt", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        sizes[kind] = (info["image_size"], info["input_shape"], info["loaded"].rsplit(", ", 1)[-1])
    assert sizes == {"pixels": (8, [1, 8, 8], "8x8 pixels"), "vae": (64, [1, 8, 8], "8x8 latents")}


def test_model_info_at_512_as_a_script():
    out = subprocess.run(
        [sys.executable, "cli.py", "model-info", "--model", "DiT-S/2", "--image-size", "512", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["input_shape"] == [4, 64, 64]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            '{"hidden_size": "x"}',
            "model_kwargs hidden_size='x' (str) does not fit DiCo-S, whose hidden_size is of type int",
        ),
        ('{"depth": 2}', "model_kwargs depth=2 (int) does not fit DiCo-S, whose depth is of type list"),
        ('{"hiden_size": 8}', "DiCo-S takes no argument ['hiden_size'] (model_kwargs); it takes: "),
    ],
)
def test_model_info_with_bad_model_kwargs_is_one_line_naming_the_key(kwargs, message, capsys):
    assert cli.entry(["model-info", "--model", "DiCo-S", "--model_kwargs", kwargs]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_unknown_command_and_option_fail(capsys):
    assert cli.main(["nonsense"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["model-info", "--model", "DiCo-S", "--typo", "1"])


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash\n")[1:]]
    test_command = next(b for b in blocks if b.endswith("pytest -q"))
    assert test_command in (ROOT / ".ci" / "run").read_text()
    main_command = blocks[0]
    assert main_command.endswith("python cli.py fit -c experiments/quickstart.yaml")


def test_batch_limits_read_a_whole_number_as_a_count_and_a_decimal_as_a_fraction(monkeypatch):
    """Lightning: an int limits the number of batches, a float the fraction. Its Trainer types the limits
    ``float | int``, so LightningCLI used to read ``1`` as ``1.0``: every batch."""
    monkeypatch.chdir(ROOT)
    built = cli.build_lightning_cli(
        [
            "-c",
            "experiments/quickstart.yaml",
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.limit_train_batches",
            "1.0",
            "--trainer.limit_test_batches",
            "0.25",
            "--trainer.limit_predict_batches",
            "3",
        ],
        run=False,
    )
    trainer = built.trainer
    assert (trainer.limit_val_batches, trainer.limit_train_batches) == (1, 1.0)
    assert type(trainer.limit_val_batches) is int and type(trainer.limit_train_batches) is float
    assert trainer.limit_test_batches == 0.25 and trainer.limit_predict_batches == 3
    assert type(trainer.limit_predict_batches) is int


def test_extract_command_with_the_documented_options(tmp_path, image_folder, tiny_vae_dir, capsys):
    out = tmp_path / "latents"
    args = [
        "extract",
        "--data-path",
        str(image_folder),
        "--out",
        str(out),
        "--image-size",
        "16",
        "--vae",
        str(tiny_vae_dir),
        "--num-workers",
        "0",
        "--shard-size",
        "5",
        "--progress",
        "false",
    ]
    assert cli.main(args) == 0
    assert "12 images" in capsys.readouterr().out and (out / "manifest.json").exists()
    assert cli.main(args) == 0  # a second run finds every shard done


def printed_config(capsys, *args: str) -> dict:
    """``cli.py fit ARGS --print_config`` as a dict (interpolations resolved, the named callbacks included)."""
    import yaml

    with pytest.raises(SystemExit):
        cli.main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def strings(node) -> list[str]:  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def test_the_quickstart_writes_everything_under_default_root_dir(capsys, monkeypatch, tmp_path):
    """Checkpoints, logs, wandb, the digits FID reference and classifier: one option moves the whole run."""
    monkeypatch.chdir(ROOT)
    root = str(tmp_path / "elsewhere")
    config = printed_config(capsys, "-c", "experiments/quickstart.yaml", "--trainer.default_root_dir", root)
    run = {key: config[key] for key in ("trainer", *CALLBACKS)}  # the trainer and the named callbacks
    paths = [s for s in strings(run) if "/" in s or s.endswith((".npz", ".pt", ".ckpt"))]
    assert len(paths) >= 5 and all(p.startswith(root) for p in paths), paths
    assert config["checkpoint"]["init_args"]["dirpath"] == f"{root}/checkpoints"
    assert config["fid"]["init_args"]["reference"] == f"{root}/digits-reference.npz"


CONFIGS = {
    "paper": ["-c", "experiments/base.yaml", "-c", "experiments/dico-s-256.yaml"],
    "quickstart": ["-c", "experiments/quickstart.yaml"],
    "quickstart-tiny": ["-c", "experiments/quickstart.yaml", "-c", "dico/analysis/quickstart-tiny.yaml"],
    **{
        f"budget-{p.stem}": ["-c", "experiments/base.yaml", "-c", str(p.relative_to(ROOT))]
        for p in sorted((ROOT / "ablations" / "configs" / "budgets").glob("*.yaml"))
    },
}


@pytest.fixture(scope="module")
def composed() -> dict[str, dict]:
    """Each of :data:`CONFIGS` as ``cli.py fit --print_config`` composes it."""
    import contextlib
    import io
    import os

    import yaml

    old, printed = os.getcwd(), {}
    os.chdir(ROOT)
    try:
        for name, args in CONFIGS.items():
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                cli.main(["fit", *args, "--print_config"])
            printed[name] = yaml.safe_load(out.getvalue())
    finally:
        os.chdir(old)
    return printed


def test_every_config_composes_the_one_callback_list(composed):
    """The paper setups, the quickstart (and its CI-sized overlay) and every ablation budget run the named callbacks
    of dico/callbacks/named.py, each of its class or off; what differs between them is named values."""
    import yaml

    from dico.callbacks.named import class_path

    classes = {key: class_path(cls) for key, cls in CALLBACKS.items()}
    for name, c in composed.items():
        assert {key: (c[key] or {"class_path": classes[key]})["class_path"] for key in CALLBACKS} == classes, name
    decays = {name: c["ema"]["init_args"]["decay"] for name, c in composed.items()}
    assert decays["paper"] == 0.9999 and decays["quickstart"] == 0.995 and decays["quickstart-tiny"] == 0.999
    for path in [
        ROOT / "experiments" / "base.yaml",
        ROOT / "experiments" / "quickstart.yaml",
        *(ROOT / "ablations" / "configs" / "budgets").glob("*.yaml"),
        ROOT / "dico" / "analysis" / "quickstart-tiny.yaml",
    ]:
        assert "callbacks" not in (yaml.safe_load(path.read_text()).get("trainer") or {}), path


def stated_callback_arguments(path) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """The named callbacks' arguments that a YAML file states: ``{key: {argument: value}}``."""
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    return {key: dict(config[key].get("init_args") or {}) for key in CALLBACKS if isinstance(config.get(key), dict)}


def test_each_callback_default_is_stated_once(composed):
    """A callback argument's default is its signature's; a config states only what differs from it (Lightning's own
    callbacks: dico/callbacks/callbacks.yaml, once for every run). No YAML file restates a signature default, and
    every composed argument that differs from its signature's is stated by one of the config's files."""
    import inspect

    import dico.callbacks.named as named

    def signature(key: str) -> dict:
        parameters = inspect.signature(CALLBACKS[key].__init__).parameters.values()
        return {  # a YAML list states a tuple default too
            p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in parameters
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
        }

    table = ROOT / "dico" / "callbacks" / named.SETTINGS_FILE
    files = [table, *(ROOT / "experiments").glob("*.yaml"), *(ROOT / "ablations" / "configs").rglob("*.yaml")]
    restated = {}
    for path in [*files, *(ROOT / "dico" / "analysis").glob("*.yaml")]:
        for key, stated in stated_callback_arguments(path).items():
            defaults = signature(key)
            same = {arg: value for arg, value in stated.items() if arg in defaults and defaults[arg] == value}
            restated.update({(path.relative_to(ROOT).as_posix(), key, arg): value for arg, value in same.items()})
    assert restated == {}
    for name, args in CONFIGS.items():
        stated: dict[str, set[str]] = {key: set() for key in CALLBACKS}
        for path in [table, *(ROOT / a for a in args[1::2])]:
            for key, arguments in stated_callback_arguments(path).items():
                stated[key] |= set(arguments)
        for key in CALLBACKS:
            arguments = (composed[name][key] or {}).get("init_args") or {}
            differ = {arg for arg, value in arguments.items() if value != signature(key)[arg]}
            assert differ <= stated[key], (name, key, differ - stated[key])


def test_user_errors_are_one_line_naming_the_fix_without_a_traceback(tmp_path, capsys, monkeypatch):
    """A bad model name, an empty reference file, a missing --source folder: one line that names the fix, exit status
    1, nothing written; DICO_TRACEBACK=1 gives the traceback instead."""
    monkeypatch.chdir(tmp_path)

    def error_line(*argv: str) -> str:
        capsys.readouterr()
        assert cli.entry(list(argv)) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        [line] = [line for line in err.splitlines() if "error:" in line]
        return line

    fit = ["fit", "-c", str(QUICKSTART), "--model.model", "DiCo-Q", "--trainer.logger", "false"]
    line = error_line(*fit)
    assert "unknown model 'DiCo-Q'" in line and "DiCo-S," in line and "DiT-XL/2" in line
    (tmp_path / "empty.npz").write_bytes(b"")
    line = error_line("evaluate", "--samples", "s.npz", "--reference", "empty.npz")
    assert "empty.npz is not a dico reference-statistics file" in line and "cli.py reference" in line
    digits = ["--feature_extractor", "dico-digits", "--weights_path", str(tmp_path / "clf.pt")]
    line = error_line("reference", "--source", "no/such/folder", "--image_size", "8", "--out", "ref.npz", *digits)
    assert "--source no/such/folder does not exist" in line and "--data-path" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.npz"]  # no classifier trained, no reference
    monkeypatch.setenv("DICO_TRACEBACK", "1")
    with pytest.raises(KeyError, match="DiCo-Q"):
        cli.entry(fit)


def test_a_callback_is_turned_off_and_on_by_name(monkeypatch):
    """``--fid null`` turns a named callback off, naming its class turns it on (the held-out loss is off by default:
    only the crops16 budget scores by it), and a name that is not a named callback is refused rather than ignored."""
    from dico.callbacks import EMA, FIDEvaluation, HeldOutLoss

    monkeypatch.chdir(ROOT)
    base = ["-c", "experiments/quickstart.yaml", "--trainer.logger", "false"]
    kinds = [type(c) for c in cli.build_lightning_cli(base, run=False).trainer.callbacks]
    assert EMA in kinds and FIDEvaluation in kinds and HeldOutLoss not in kinds
    built = cli.build_lightning_cli([*base, "--fid", "null", "--heldout_loss", "HeldOutLoss"], run=False)
    kinds = [type(c) for c in built.trainer.callbacks]
    assert HeldOutLoss in kinds and FIDEvaluation not in kinds and EMA in kinds
    with pytest.raises(SystemExit):
        cli.build_lightning_cli([*base, "--fidd", "null"], run=False)


# the deleted relay's fid_* names
FORMER_FID_SETTINGS = [
    "reference",
    "reference_source",
    "feature_extractor",
    "weights_path",
    "at_start",
    "every_n_steps",
    "num_samples",
    "batch_size",
    "sampler",
    "steps",
    "test_num_samples",
    "test_sampler",
    "test_steps",
    "test_save_samples",
]


def test_a_former_callback_settings_block_is_refused_naming_where_each_value_goes(tmp_path, capsys):
    """A config (or option) from before the named callbacks, with ``callback_settings:``, gets one line naming each
    value's new key, and every new key the message names is an argument of that key's callback."""
    import inspect

    from dico.callbacks.named import RENAMED

    old = tmp_path / "old.yaml"
    old.write_text("callback_settings:\n  ema_decay: 0.999\n  fid_num_samples: 100\n  grid_classes_shown: 4\n")
    assert cli.entry(["fit", "-c", str(QUICKSTART), "-c", str(old), "--print_config"]) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "callback_settings is gone" in line
    assert "ema_decay -> ema.decay" in line and "fid_num_samples -> fid.num_samples" in line
    assert "grid_classes_shown -> grid.num_classes_shown" in line
    assert cli.entry(["fit", "-c", str(QUICKSTART), "--callback_settings.ema_warmup", "true"]) == 1
    assert "ema_warmup -> ema.warmup" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"  # a config that is not YAML is jsonargparse's to name, as before
    broken.write_text("model: [unclosed\n")
    with pytest.raises(SystemExit):
        cli.entry(["fit", "-c", str(QUICKSTART), "-c", str(broken), "--print_config"])
    assert "expected ',' or ']'" in capsys.readouterr().err
    moved = [v for k, v in RENAMED.items() if k != "disabled"] + [f"fid.{k}" for k in FORMER_FID_SETTINGS]
    for target in moved:
        key, _, argument = target.partition(".")
        assert argument in inspect.signature(CALLBACKS[key]).parameters, target


PREFIXES = [
    (["sample", "--cfg", "2"], "--cfg"),
    (["model-info", "--model", "DiCo-S", "--js"], "--js"),
    (["fit", "-c", str(QUICKSTART), "--trainer.max_st", "5", "--print_config"], "--trainer.max_st"),
]


@pytest.mark.parametrize(("argv", "prefix"), PREFIXES)
def test_options_are_taken_whole_not_as_prefixes(argv, prefix, capsys):
    """argparse would read ``--cfg`` as ``--cfg_scale``, ``--js`` as ``--json``: every parser refuses a prefix."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2 and f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_every_parser_of_the_project_takes_options_whole():
    """Every ``ArgumentParser`` of the project (the CLI, the ablation runner, benchmarks, notebooks' runner) refuses
    a prefix: ``--row`` is not ``--rows`` (argparse's default would take it)."""
    import ast

    files = [
        ROOT / "cli.py",
        *(p for d in ("dico", "ablations", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))),
    ]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser"
            ):
                kwargs = {k.arg: k.value for k in node.keywords}
                whole = isinstance(kwargs.get("allow_abbrev"), ast.Constant) and kwargs["allow_abbrev"].value is False
                found.append((path.relative_to(ROOT).as_posix(), whole or None in kwargs))  # None: **PARSER_KWARGS
    assert {"cli.py", "ablations/run.py", "benchmarks/gpu_fit.py"} <= {f for f, _ in found}  # the scan sees them
    assert [f for f, ok in found if not ok] == []
    from ablations import run

    with pytest.raises(SystemExit):
        run.parse(["--table", "4", "--row", "DiCo-S"])


BAD_SIZES = [
    ("--image-size", "0", "--image-size must be a positive multiple of 8"),
    ("--image-size", "-16", "--image-size must be a positive multiple of 8"),
    ("--shard-size", "0", "--shard-size must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD_SIZES)
def test_extract_refuses_invalid_sizes_in_one_line_writing_nothing(
    tmp_path, image_folder, option, value, message, capsys
):
    """``--image-size 0`` used to call every image unreadable and exit 0 with an empty cache."""
    sizes = {"--image-size": "16", "--shard-size": "5", "--batch-size": "4", option: value}
    argv = ["extract", "--data-path", str(image_folder), "--out", str(tmp_path / "out"), "--vae", "no/such-vae"]
    argv += ["--num-workers", "0", "--progress", "false", *[s for kv in sizes.items() for s in kv]]
    assert cli.entry(argv) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert message in line and not (tmp_path / "out").exists()
