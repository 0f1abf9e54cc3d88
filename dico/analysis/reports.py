"""The ablation runner's results read back (``ablations/results/table{3,4}-<budget>.csv``), beside the paper's
complete Tables 3 and 4."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dico.models.ablation import TABLE3, TABLE4, paper_tables

TABLE_KEYS = {"3": TABLE3, "4": TABLE4}
_NAME = re.compile(r"^table(?P<table>[34])-(?P<budget>[A-Za-z0-9_]+)$")
#: Columns of the runner's CSV that stay text.
TEXT_COLUMNS = (
    "row",
    "model",
    "fid_per_seed",
    "fid_seeds",
    "sdpa_kernel",
    "commit",
    "config_sha256",
    "feature_extractor_sha256",
    "reference_sha256",
    "wandb",
)


@dataclass
class ResultTable:
    """One results file: ``rows`` as dicts, numbers as floats and empty cells as NaN."""

    path: Path
    table: str  # "3" or "4"
    budget: str
    rows: list[dict[str, Any]]

    @property
    def trained(self) -> bool:
        """Whether this budget trained and scored rows (an FID in any row; a partial table has empty rows)."""
        return any(not math.isnan(r["fid"]) for r in self.rows)

    def column(self, name: str) -> list[Any]:
        return [r[name] for r in self.rows]


def _number(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


def read_result_csv(path: str | Path) -> ResultTable:
    """Read ``table<3|4>-<budget>.csv`` written by ``ablations/report.py``."""
    path = Path(path)
    match = _NAME.match(path.stem)
    if not match:
        raise ValueError(f"{path.name}: expected a name table3-<budget>.csv or table4-<budget>.csv")
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    rows = [{k: (v if k in TEXT_COLUMNS else _number(v)) for k, v in r.items()} for r in raw]
    return ResultTable(path, match["table"], match["budget"], rows)


def read_results(results_dir: str | Path, budget_order: Sequence[str] = ()) -> list[ResultTable]:
    """Every ``table*-*.csv`` in ``results_dir``, by table, then by ``budget_order`` (the ablation suite's budgets
    are its record's: ``list(ablations.budgets.BUDGETS)``; the package knows none), then by name."""
    tables = [read_result_csv(p) for p in sorted(Path(results_dir).glob("table[34]-*.csv"))]
    rank = {b: i for i, b in enumerate(budget_order)}
    return sorted(tables, key=lambda t: (t.table, rank.get(t.budget, len(rank)), t.budget))


def paper_table(table: str) -> list[dict[str, Any]]:
    """The paper's complete Table 3 or 4 (every row), with ``throughput_ratio`` to its DiCo-S (U-shape) row."""
    entry = paper_tables()[TABLE_KEYS[table]]
    rows = [dict(r) for r in (entry["rows"] if isinstance(entry, dict) else entry)]
    reference = next(r for r in rows if r["row"] in ("DiCo-S", "DiCo (U-shape)"))
    for r in rows:
        r["throughput_ratio"] = r["throughput"] / reference["throughput"]
    return rows


__all__ = ["ResultTable", "paper_table", "read_result_csv", "read_results"]
