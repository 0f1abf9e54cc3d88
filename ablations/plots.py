"""The ablation table's figure: ours beside the paper's (:func:`plot_table`; each contrast along the steps is
:func:`ablations.curves.plot_curves`). matplotlib's ``Figure`` without pyplot, so a caller's backend (e.g. a
notebook's) is left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_table(table: str, budget: str, rows: list[dict[str, Any]], path: Path) -> Path:
    """Ours (FID, or Gflops ratio without training, vs throughput ratio) beside the paper's."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    trained = any(r["fid"] != "" for r in rows)
    fig = Figure(figsize=(11, 4.5))
    ours, paper = fig.subplots(1, 2)
    for r in rows:
        paper.scatter(r["paper_throughput_ratio"], r["paper_fid"], color="tab:gray")
        paper.annotate(r["row"], (r["paper_throughput_ratio"], r["paper_fid"]), fontsize=7)
        y = r["fid"] if trained else r["gflops_ratio"]
        if r["throughput_ratio"] != "" and y != "":
            ours.scatter(r["throughput_ratio"], y, color="tab:red")
            ours.annotate(r["row"], (r["throughput_ratio"], y), fontsize=7)
    ours.set(
        xlabel="throughput / DiCo-S (ours, interleaved)",
        ylabel=f"{budget} FID" if trained else "Gflops / DiCo-S",
        title=f"ours: Table {table}, {budget} budget",
    )
    paper.set(xlabel="throughput / DiCo-S (paper, A100)", ylabel="FID-50K", title="paper")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
