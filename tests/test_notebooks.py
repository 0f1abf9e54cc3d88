"""Every notebook in notebooks/ runs top to bottom at the tiny size (``DICO_NOTEBOOK_SIZE=tiny``), and none is
committed with outputs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import nbformat
import pytest

from dico.analysis.notebook import clear_outputs, execute_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; a whole tiny notebook takes under a minute on a 2-core CPU


def outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_every_analysis_notebook_is_here():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart",
        "02_attention_locality",
        "03_channel_activation",
        "04_ablation_report",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"
    assert "widgets" not in nb.metadata


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_at_tiny_size(path, tmp_path, monkeypatch):
    monkeypatch.delenv("DICO_DIT_CHECKPOINT", raising=False)
    env = {
        "DICO_NOTEBOOK_WORKDIR": str(tmp_path / "work"),  # runs made by the notebook go here
        "DICO_ABLATION_RESULTS": str(tmp_path / "no-results"),  # 04: take the "no results yet" path
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    start = time.perf_counter()
    nb = execute_notebook(path, "tiny", out=tmp_path / "executed", timeout=CELL_TIMEOUT, env=env)  # raises on errors
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert any("size: tiny" in o.get("text", "") for o in outputs(nb)), "the kernel did not get the tiny size"
    assert any("image/png" in o.get("data", {}) for o in outputs(nb)), "the notebook drew nothing"
    executed = tmp_path / "executed" / path.name
    assert executed.exists() and not clear_outputs(path)  # the committed file is untouched
    copy = tmp_path / "copy.ipynb"
    shutil.copy(executed, copy)
    assert clear_outputs(copy) and not outputs(nbformat.read(copy, as_version=4))
