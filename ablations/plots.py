"""The ablation tables' figures: ours beside the paper's (:func:`plot_table`), and each contrast along the steps
(:func:`plot_curves`). matplotlib's ``Figure`` without pyplot, so a caller's backend (e.g. a notebook's) is left
alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ablations import stats

if TYPE_CHECKING:
    from ablations.curves import ContrastCurve


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


def plot_curves(
    score: str, label: str, curves: list[ContrastCurve], rows: dict[str, dict[int, dict[int, float]]], path: Path
) -> Path:
    """One panel of the rows' geometric means over steps, then one per contrast: the ratio against the step with its
    interval band, 1.0 and the paper's ratio as lines, resolved steps filled."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    n = 1 + len(curves)
    cols = min(n, 4)
    fig = Figure(figsize=(4 * cols, 3.2 * math.ceil(n / cols)))
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for row, steps in rows.items():
        if len(steps) >= 2:
            xs = sorted(steps)
            axes[0].plot(xs, [stats.row_interval(steps[s]).geomean for s in xs], marker=".", label=row)
    axes[0].set(yscale="log", xlabel="step", ylabel=label, title="rows (geometric mean over seeds)")
    axes[0].legend(fontsize=6)
    for ax, c in zip(axes[1:], curves, strict=False):
        xs = [s for s, _ in c.points]
        ax.plot(xs, [k.ratio for _, k in c.points], color="tab:blue")
        band = [(s, k) for s, k in c.points if k.low is not None]
        if band:
            ax.fill_between(
                [s for s, _ in band],
                [k.low for _, k in band],
                [k.high for _, k in band],  # type: ignore[misc]
                color="tab:blue",
                alpha=0.2,
                label=f"{1 - stats.ALPHA:.0%} interval",
            )
        for resolved in (True, False):
            pts = [(s, k.ratio) for s, k in c.points if k.resolved == resolved]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True),
                    s=18,
                    color="tab:blue" if resolved else "white",
                    edgecolors="tab:blue",
                    zorder=3,
                    label="resolved" if resolved else "not resolved",
                )
        ax.axhline(1.0, color="black", lw=0.8)
        if c.paper_ratio is not None:
            ax.axhline(c.paper_ratio, color="tab:red", ls="--", lw=0.8, label="paper (FID)")
        ax.set(xlabel="step", ylabel=f"{label} ratio", title=f"{c.worse} / {c.better}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
