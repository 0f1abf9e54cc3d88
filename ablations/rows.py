"""The rows of Tables 3 and 4 as LightningCLI configs: which files make a row, and the row overlays themselves.

A row trains as ``python cli.py fit`` on four composed configs::

    experiments/base.yaml                     the paper's training setup (ImageNet 256, Table 6, 400K steps)
    ablations/configs/table{3,4}.yaml         the table: wandb group, one run per row
    ablations/configs/budgets/<budget>.yaml   the budget (:mod:`ablations.budgets`)
    ablations/configs/rows/<model>.yaml       the row: its registry model (full size), or, for the reduced-size
                                              budgets, rows/<folder>/<model>.yaml (the budget's ``rows``: its
                                              scaling rule's size, e.g. rows/digits/ for the 8x8 digits)

The row overlays are generated from the variant table (:data:`dico.models.ablation.VARIANTS`) and the proxy
scaling rule (:func:`dico.shape_search.proxy_shape`); ``python ablations/rows.py`` rewrites them.
"""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from ablations.budgets import BASE, budget_of, reduced_rows  # noqa: E402
from dico.models.ablation import ABLATION_ROWS, TABLE3, TABLE4, VARIANTS, AblationRow  # noqa: E402

CONFIGS = ROOT / "ablations" / "configs"
TABLES = {"3": TABLE3, "4": TABLE4}


def slug(name: str) -> str:
    """A file/folder name for a registry name: ``DiT-S/2`` -> ``dit-s-2``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def canonical(model: str) -> str:
    """The first registered variant identical to ``model`` (same constructor and arguments): ``DiCo-S-SelfAttn``
    (Table 4 "CM->Self-Attn") -> ``DiT-U`` (Table 3 "DiT (U-shape)"). Runs are keyed by it."""
    v = VARIANTS[model]
    return next(n for n, w in VARIANTS.items() if (w.arch, dict(w.kwargs)) == (v.arch, dict(v.kwargs)))


@dataclass(frozen=True)
class Row:
    """One training run: a paper row's model at a budget and seed. Runs are keyed by (budget, model, seed), not by
    table row, so a model in both tables (DiCo-S; the U-shaped DiT = CM->Self-Attn, see :func:`canonical`) trains
    once."""

    table: str  # "3" or "4"
    row: str  # the paper's row name
    model: str  # registry name (the row overlay names it)
    budget: str
    seed: int = 0

    @property
    def entry(self) -> AblationRow:
        return ABLATION_ROWS[TABLES[self.table], self.row]

    @property
    def key(self) -> str:
        return f"{self.budget}/{slug(canonical(self.model))}/seed{self.seed}"

    def overlay(self) -> Path:
        folder = budget_of(self.budget).rows
        return CONFIGS / "rows" / (folder or "") / f"{slug(self.model)}.yaml"

    def configs(self) -> list[Path]:
        return [BASE, CONFIGS / f"table{self.table}.yaml", budget_of(self.budget).config, self.overlay()]

    def run_dir(self, out: Path) -> Path:
        return out / self.key

    def cli_args(self, out: Path, extra: list[str] | tuple[str, ...] = (), absolute: bool = False) -> list[str]:
        """Arguments of ``python cli.py fit|test`` (after the subcommand) that train/score this row: its config
        files relative to the checkout (where the commands run), or ``absolute``."""
        args = [a for c in self.configs() for a in ("-c", str(c if absolute else c.relative_to(ROOT)))]
        return [
            *args,
            "--seed_everything",
            str(self.seed),
            "--trainer.default_root_dir",
            str(self.run_dir(out)),
            *extra,
        ]


def rows_of(table: str, budget: str, names: list[str] | None = None, seeds: list[int] | None = None) -> list[Row]:
    """The rows of a table (``names``: a subset, by paper row name), each at every seed."""
    entries = [r for (t, _), r in ABLATION_ROWS.items() if t == TABLES[table]]
    if names:
        unknown = set(names) - {r.row for r in entries}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; table {table} has {[r.row for r in entries]}")
        entries = [r for r in entries if r.row in names]
    return [Row(table, r.row, r.model, budget, s) for s in (seeds or [0]) for r in entries]


def _yaml(model: str, kwargs: dict[str, Any] | None, header: str) -> str:
    import yaml

    model_section: dict[str, Any] = {"model": model}
    if kwargs:
        model_section["model_kwargs"] = kwargs
    body = yaml.safe_dump({"model": model_section}, sort_keys=False, default_flow_style=False)
    return header + body


def row_overlays() -> dict[Path, str]:
    """Every row overlay's path and text, from the variant table and the proxy scaling rules."""
    from dico.shape_search import proxy_shape

    rules = reduced_rows()
    out: dict[Path, str] = {}
    for name, variant in VARIANTS.items():
        rows = ", ".join(f"Table {t[5]} {r!r}" for (t, r), e in ABLATION_ROWS.items() if e.model == name)
        header = "".join(f"# {line}\n" for line in textwrap.wrap(f"{rows}: {variant.note}", 116))
        header += "# Generated by `python ablations/rows.py` from dico/models/ablation.py.\n"
        out[CONFIGS / "rows" / f"{slug(name)}.yaml"] = _yaml(name, None, header)
        for folder, rule in rules.items():
            shape = proxy_shape(name, rule=rule)
            note = f"# Reduced size (dico.shape_search.proxy_shape: widths / {rule.width_divisor}, {rule.description}"
            if shape.errors is not None:
                note += ", depths re-adjusted: {:+.1%} params, {:+.1%} Gflops vs the scaled paper ratios".format(
                    *shape.errors
                )
            note += f"): {shape.params:,} params, {shape.macs / 1e6:.2f} MMACs."
            note = "".join(f"# {line}\n" for line in textwrap.wrap(note[2:], 116))
            overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in shape.overrides.items()}
            if "mlp_ratio" in overrides:
                overrides["mlp_ratio"] = float(overrides["mlp_ratio"])
            out[CONFIGS / "rows" / folder / f"{slug(name)}.yaml"] = _yaml(name, overrides, header + note)
    return out


def main() -> None:  # pragma: no cover - regenerates committed files
    for path, text in row_overlays().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":  # pragma: no cover
    main()
