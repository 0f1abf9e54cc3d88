"""The Lightning internals of ``dico.compat`` still exist in the installed Lightning with the shapes dico uses, and
nothing else in dico reaches into Lightning's private names."""

from __future__ import annotations

import ast
import inspect

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from dico.compat import PRIVATE_NAMES
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> dict[type, object]:
    """One object of each owner: attributes set in ``__init__`` exist only on instances."""
    root = tmp_path_factory.mktemp("compat")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)
    return {
        Trainer: trainer,
        type(trainer.fit_loop.epoch_loop): trainer.fit_loop.epoch_loop,
        ModelCheckpoint: ModelCheckpoint(dirpath=root),
        WeightAveraging: WeightAveraging(),
        ExperimentWriter: ExperimentWriter(str(root / "writer")),
        CSVLogger: CSVLogger(root),
    }


@pytest.mark.parametrize(("owner", "name", "params"), PRIVATE_NAMES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_the_private_lightning_names_dico_relies_on_exist(owner, name, params, instances):
    obj = instances[owner]
    assert hasattr(obj, name), f"{owner.__name__}.{name} is gone from this Lightning: update dico/compat.py"
    if params is not None:
        signature = inspect.signature(getattr(owner, name))
        assert list(signature.parameters)[1:] == params, f"{owner.__name__}.{name}{signature} changed"


def test_compat_is_the_only_place_that_reaches_into_private_lightning_names():
    """``obj._name`` on a Lightning object, or ``from lightning... import _name``, appears only in dico/compat.py
    (dico's subclasses may use the names they override, listed in PRIVATE_NAMES)."""
    private = {name for _, name, _ in PRIVATE_NAMES} | {"_trainer", "_latest_update_step", "_parse_ckpt_path"}
    overridden = {"_check_log_dir_exists", "_experiment", "_fs"}  # dico/loggers.py's overrides
    offenders = []
    for path in [*sorted((ROOT / "dico").rglob("*.py")), ROOT / "cli.py"]:
        if path.name == "compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in private - overridden:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and node.name in private - overridden:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} def {node.name}")
    assert not offenders, offenders
