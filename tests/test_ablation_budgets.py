"""The ablation budgets have one home (``ablations/budgets.py``), and a row's config is composed in this process by
``cli.py``'s own parser."""

from __future__ import annotations

import ast
import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from ablations import compose, stages
from ablations.budgets import BUDGETS, budget_of
from ablations.rows import ROOT, rows_of
from dico.callbacks.named import CALLBACKS

RECORD = ROOT / "ablations" / "budgets.py"
#: string literals equal to a budget name that are not budgets: (file, name) -> how many, and what they are
NOT_BUDGETS = {
    ("ablations/stages.py", "paper"): 1,  # result.json's "paper" field: the paper's numbers of the row
    ("ablations/plots.py", "paper"): 1,  # the title of the plot's panel of the paper's numbers
}


def budget_literals(root: Path, names: set[str]) -> Counter[tuple[str, str]]:
    """(file, budget name) of every string literal in ``ablations/``, ``dico/`` and ``cli.py`` (the record aside)
    that is a budget name or names a budget's YAML (``budgets/<name>.yaml``)."""
    files = [*(root / "ablations").rglob("*.py"), *(root / "dico").rglob("*.py"), root / "cli.py"]
    found: Counter[tuple[str, str]] = Counter()
    for path in files:
        if path.resolve() == (root / "ablations" / "budgets.py").resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in names:
                    if node.value == name or f"budgets/{name}.yaml" in node.value:
                        found[str(path.relative_to(root)), name] += 1
    return found


def test_no_budget_name_is_spelled_outside_its_record():
    """A new budget is one record and one YAML: no table, report, runner or search names a budget itself."""
    found = budget_literals(ROOT, set(BUDGETS))
    assert dict(found) == NOT_BUDGETS
    # the scan sees what it looks for: the record spells every name
    assert {n for n in BUDGETS if f'"{n}"' in RECORD.read_text()} == set(BUDGETS)


def test_a_rows_config_is_composed_in_process_as_print_config_prints_it(tmp_path, monkeypatch):
    """``compose.resolve`` is ``python cli.py fit <row> --print_config``'s dict (less that subcommand's own
    ``ckpt_path``/``weights_only``), composed by the same parser in this process: from any working directory, with
    this process's own command line left alone, nothing printed, nothing seeded, no ``cli.main``."""
    import cli

    [row] = rows_of("4", "proxy", ["w/o CCA"], [3])
    extra = ["--trainer.max_steps", "7"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        cli.main(["fit", *row.cli_args(tmp_path, extra), "--print_config"])
    expected = yaml.safe_load(printed.getvalue())

    monkeypatch.chdir(tmp_path)  # the configs' relative paths are the checkout's
    monkeypatch.setattr(sys, "argv", ["ablations/run.py", "--table", "4", "--budget", "proxy"])
    monkeypatch.setattr(cli, "main", lambda *a: pytest.fail("composed through cli.main"))
    seed, said = torch.initial_seed(), io.StringIO()
    with contextlib.redirect_stdout(said):
        composed = compose.resolve(row, tmp_path, extra)
    assert said.getvalue() == "" and torch.initial_seed() == seed
    assert set(expected) - set(composed) == {"ckpt_path", "weights_only"}
    assert composed == {k: v for k, v in expected.items() if k in composed}
    assert composed["trainer"]["max_steps"] == 7 and composed["seed_everything"] == 3
    assert composed["trainer"]["default_root_dir"] == str(row.run_dir(tmp_path))


@pytest.mark.parametrize("name", list(BUDGETS))
def test_each_budget_record_says_what_its_composed_config_does(name, tmp_path):
    """The scores a budget's record declares (which decide the stages) are the ones its composed callbacks make,
    and its steps are the composed trainer's."""
    budget = budget_of(name)
    [row] = rows_of("4", name, ["DiCo-S"])
    config = compose.resolve(row, tmp_path, [])
    assert config["trainer"]["max_steps"] == budget.steps
    active = {key for key in CALLBACKS if config.get(key)}  # the named callbacks that are on
    fid = compose.fid_settings(config)
    commands = [s[0] for s in stages.stages(row, tmp_path, [])]
    if not budget.trains:
        assert commands == [] and budget.scores == ()
        return
    assert ("heldout_loss" in active) == budget.heldout_loss
    assert bool(fid) == (budget.fid is not None)
    if budget.fid == "test":
        assert fid["test_num_samples"] > 0 and commands == ["fit", "test"]
    else:
        assert commands == ["fit"]
    if budget.fid == "last_step":
        assert fid["test_num_samples"] == 0 and fid["every_n_steps"] == budget.steps
    assert row.overlay().parent.name == (budget.rows or "rows")


def test_result_tables_are_ordered_by_the_budget_record(tmp_path):
    """``dico.analysis.reports`` knows no budget: the caller passes the record's order (crops16 included)."""
    from dico.analysis.reports import read_results

    for name in ("paper", "crops16", "proxy"):
        (tmp_path / f"table4-{name}.csv").write_text("row,fid\nDiCo-S,1.0\n")
    assert [t.budget for t in read_results(tmp_path, list(BUDGETS))] == ["proxy", "crops16", "paper"]
    assert [t.budget for t in read_results(tmp_path)] == ["crops16", "paper", "proxy"]  # by name without one
