"""Ablation verdicts across training length: every row's score at each recorded step, each contrast as a curve.

A row scores itself at a fixed list of steps while it trains (the held-out loss: ``HeldOutLoss``'s ``steps``, in
``<run>/eval/heldout_step_N.json``; the periodic FID: ``FIDEvaluation``'s ``every_n_steps``, in
``<run>/eval/step_N.json``). The files are in the run folder, so a row resumed from ``last.ckpt`` keeps the scores
made before; :func:`recorded_scores` gathers them into ``result.json``'s ``curve`` when the row finishes.

``collect`` (:func:`write_curves`) then gives, for each pre-declared contrast of :data:`ablations.findings.CONTRASTS`
and each score, the paired ratio with its interval at every recorded step (:func:`ablations.stats.paired_contrast`,
the tables' statistics), as a CSV, a plot and Markdown lines, with a verdict on whether the contrast's sign is
stable over the last half of its steps (:func:`sign_stability`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablations import stats

#: a stability verdict needs at least this many tested steps (>= 2 paired seeds) in the last half
MIN_LAST_HALF = 2


# ------------------------------------------------------------------------------------------ one row's scores
def recorded_scores(run_dir: Path) -> list[dict[str, Any]]:
    """The scores a run recorded along the way: ``[{"step": N, "metrics": {...}}, ...]`` by step, the held-out
    loss and the periodic FID of one step merged."""
    by_step: dict[int, dict[str, float]] = {}
    for pattern in ("step_*.json", "heldout_step_*.json"):
        for path in sorted((run_dir / "eval").glob(pattern)):
            step = int(path.stem.rsplit("_", 1)[1])
            by_step.setdefault(step, {}).update(json.loads(path.read_text())["metrics"])
    return [{"step": step, "metrics": metrics} for step, metrics in sorted(by_step.items())]


def steps_of(result: Mapping[str, Any], metric: str) -> dict[int, float]:
    """``{step: score}`` of one finished run: its ``curve``, and its final ``metrics`` at its last step (a run of an
    older runner has only these; a score added after training, e.g. crops16's patch FID, is only there)."""
    points = {p["step"]: p["metrics"][metric] for p in result.get("curve") or [] if metric in p["metrics"]}
    if metric in (result.get("metrics") or {}) and result.get("steps") is not None:
        points[int(result["steps"])] = result["metrics"][metric]
    return dict(sorted(points.items()))


def row_scores(
    results: Sequence[Mapping[str, Any]], metric: str, key: Any, shown: str = "{}"
) -> dict[Any, dict[int, dict[int, float]]]:
    """``{key(result): {step: {seed: score}}}`` over finished runs (``key``: e.g. the run's canonical model), each
    score rounded as ``shown`` writes it (the table's per-seed format, so that its last step is the table's)."""
    out: dict[Any, dict[int, dict[int, float]]] = {}
    for r in results:
        for step, value in steps_of(r, metric).items():
            out.setdefault(key(r), {}).setdefault(step, {})[int(r["seed"])] = float(shown.format(value))
    return out


# ------------------------------------------------------------------------------------------ contrast curves
@dataclass(frozen=True)
class Stability:
    """Whether a contrast's sign holds over the last half of its tested steps (``steps``).

    ``verdict``: ``stable`` (every interval there excludes 1, all on one side: ``agrees`` says which), ``unstable``
    (the ratio crosses 1 there), ``not established`` (one side by the point ratios, some interval includes 1) or
    ``too few steps``."""

    verdict: str
    agrees: bool | None
    steps: tuple[int, ...]
    unresolved: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()

    @property
    def stable(self) -> bool:
        return self.verdict == "stable"

    def describe(self) -> str:
        if self.verdict == "too few steps":
            return (
                f"too few steps for a verdict ({len(self.steps)} in the last half with >= 2 paired seeds; needs "
                f"{MIN_LAST_HALF})"
            )
        where = f"last half, steps {self.steps[0]}-{self.steps[-1]} ({len(self.steps)} steps)"
        side = "agrees" if self.agrees else "disagrees"
        if self.verdict == "stable":
            return f"sign stable over the {where}: {side} at each, every interval excluding 1"
        if self.verdict == "unstable":
            return (
                f"sign NOT stable over the {where}: the ratio crosses 1 ({min(self.ratios):.3f} to "
                f"{max(self.ratios):.3f})"
            )
        return (
            f"sign not established over the {where}: on one side of 1 ({side}), but the interval includes 1 at "
            f"step(s) {', '.join(map(str, self.unresolved))}"
        )


def sign_stability(points: Sequence[tuple[int, stats.Contrast]]) -> Stability:
    """The verdict on a contrast's ``(step, contrast)`` points: over the last half (the last ``ceil(n / 2)``) of the
    ``n`` steps tested (>= 2 paired seeds), ``stable`` when every interval excludes 1 on the same side. Each step is
    tested at the tables' ``alpha``; asking all of them to resolve is stricter than any one (no correction needed
    for the claim "same sign at every step")."""
    tested = sorted((s, c) for s, c in points if c.low is not None)
    last = tested[len(tested) - math.ceil(len(tested) / 2) :]
    steps = tuple(s for s, _ in last)
    if len(last) < MIN_LAST_HALF:
        return Stability("too few steps", None, steps)
    ratios = tuple(c.ratio for _, c in last)  # type: ignore[misc]
    signs = {(r > 1) - (r < 1) for r in ratios}
    if len(signs) > 1 or signs == {0}:
        return Stability("unstable", None, steps, ratios=ratios)
    agrees = signs == {1}
    unresolved = tuple(s for s, c in last if not c.resolved)
    return Stability("not established" if unresolved else "stable", agrees, steps, unresolved, ratios)


@dataclass(frozen=True)
class ContrastCurve:
    """A pre-declared contrast "``better`` scores lower than ``worse``" of one score at every step both rows have."""

    score: str
    better: str
    worse: str
    paper_ratio: float | None  # the paper's FID(worse) / FID(better)
    points: tuple[tuple[int, stats.Contrast], ...]

    def stability(self) -> Stability:
        return sign_stability(self.points)


def contrast_curve(
    score: str,
    better: str,
    a: Mapping[int, Mapping[int, float]],
    worse: str,
    b: Mapping[int, Mapping[int, float]],
    paper_ratio: float | None = None,
) -> ContrastCurve:
    """``a``, ``b``: ``{step: {seed: score}}`` of the two rows; a point at every step both have a seed."""
    points = tuple((s, stats.paired_contrast(better, a[s], worse, b[s])) for s in sorted(set(a) & set(b)))
    return ContrastCurve(score, better, worse, paper_ratio, tuple((s, c) for s, c in points if c.ratio is not None))


def table_curves(
    table: str, budget: str, results: list[dict[str, Any]]
) -> tuple[list[ContrastCurve], dict[str, dict[str, Any]]]:
    """Every pre-declared contrast of the table for every score, and ``{score: {row: {step: {seed: score}}}}``."""
    from ablations.findings import PER_SEED_FORMAT, SCORES
    from ablations.rows import canonical, rows_of

    names = {canonical(r.model): r.row for r in rows_of(table, budget)}
    rows = {}
    for score, metric in SCORES.items():
        by_row = row_scores(results, metric, lambda r: names.get(canonical(r["model"])), PER_SEED_FORMAT[score])
        by_row.pop(None, None)
        rows[score] = by_row
    return contrast_curves(table, rows), rows


def contrast_curves(table: str, rows: Mapping[str, Mapping[str, Any]]) -> list[ContrastCurve]:
    """Every pre-declared contrast of the table with >= 2 steps, for every score of ``rows`` (``{score: {row: {step:
    {seed: score}}}}``: :func:`table_curves`'s, or :func:`read_row_curves`' from a committed ``-rows.csv``)."""
    from ablations.findings import CONTRASTS
    from ablations.rows import TABLES
    from dico.models.ablation import paper_row

    curves = []
    for score, by_row in rows.items():
        for _, pairs in CONTRASTS.get(table, []):
            for better, worse in pairs:
                paper = paper_row(TABLES[table], worse)["fid"] / paper_row(TABLES[table], better)["fid"]
                curve = contrast_curve(score, better, by_row.get(better, {}), worse, by_row.get(worse, {}), paper)
                if len(curve.points) >= 2:
                    curves.append(curve)
    return curves


def read_row_curves(path: Path) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """``{score: {row: {step: {seed: score}}}}`` back from a ``curves-table<T>-<budget>-rows.csv``."""
    rows: dict[str, dict[str, dict[int, dict[int, float]]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            seeds = dict(zip(map(int, r["seeds"].split()), map(float, r["per_seed"].split()), strict=True))
            rows.setdefault(r["score"], {}).setdefault(r["row"], {})[int(r["step"])] = seeds
    return rows


# ------------------------------------------------------------------------------------------------ outputs
CURVE_COLUMNS = [
    "score",
    "better",
    "worse",
    "step",
    "paired_seed_ids",
    "ratio",
    "ci_low",
    "ci_high",
    "p_value",
    "resolved",
    "paper_ratio",
]
ROW_COLUMNS = ["score", "row", "step", "seeds", "per_seed", "geomean", "ci_low", "ci_high"]


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def curve_rows(curves: list[ContrastCurve]) -> list[dict[str, str]]:
    return [
        {
            "score": c.score,
            "better": c.better,
            "worse": c.worse,
            "step": str(s),
            "paired_seed_ids": " ".join(map(str, k.seeds)),
            "ratio": _g(k.ratio),
            "ci_low": _g(k.low),
            "ci_high": _g(k.high),
            "p_value": _g(k.p_value),
            "resolved": str(k.resolved),
            "paper_ratio": _g(c.paper_ratio),
        }
        for c in curves
        for s, k in c.points
    ]


def row_curve_rows(rows: dict[str, dict[str, dict[int, dict[int, float]]]]) -> list[dict[str, str]]:
    out = []
    for score, by_row in rows.items():
        for row, steps in by_row.items():
            for step, seeds in sorted(steps.items()):
                r = stats.row_interval(seeds)
                low, high = r.interval() or (None, None)
                out.append(
                    {
                        "score": score,
                        "row": row,
                        "step": str(step),
                        "seeds": " ".join(map(str, r.seeds)),
                        "per_seed": " ".join(repr(seeds[k]) for k in r.seeds),  # exact: read back as is
                        "geomean": _g(r.geomean),
                        "ci_low": _g(low),
                        "ci_high": _g(high),
                    }
                )
    return out


def curve_lines(
    curves: list[ContrastCurve],
    rows: dict[str, dict[str, dict[int, dict[int, float]]]],
    names: Mapping[str, str],
    files: Sequence[str],
) -> list[str]:
    """The report's section: for each score, each contrast's last point, its resolved steps and its sign verdict;
    each row's change over the last half of its steps (has training flattened?)."""
    level = f"{1 - stats.ALPHA:.0%}"
    lines = [
        "## Along the way: each contrast at every recorded step",
        "",
        f"Each row's score at every recorded step; for each pre-declared contrast, the paired ratio and its {level} "
        f"interval at each step, by the same statistics as the table ({', '.join(f'`{f}`' for f in files)}). A "
        f"contrast's sign is *stable* when at every step of the last half of its tested steps (>= 2 paired seeds) "
        f"the interval excludes 1 on the same side; *not stable* when the ratio crosses 1 there; otherwise not "
        f"established. (Each step at {level}; asking every step of the last half to resolve is stricter than "
        f"any one.)",
        "",
    ]
    for score in dict.fromkeys(c.score for c in curves):
        lines.append(f"- {names.get(score, score)}:")
        for c in (c for c in curves if c.score == score):
            step, last = c.points[-1]
            resolved = [str(s) for s, k in c.points if k.resolved]
            lines.append(
                f"  - {last.describe()} at step {step}; resolved at {len(resolved)} of {len(c.points)} steps"
                + (f" ({', '.join(resolved)})" if resolved else "")
                + f"; {c.stability().describe()}"
            )
    for score, by_row in rows.items():
        changes = [f"{row} {row_change(steps)}" for row, steps in by_row.items() if len(steps) >= 2]
        if changes:
            lines.append(f"- {names.get(score, score)} of each row (geometric mean over seeds): " + "; ".join(changes))
    return [*lines, ""]


def row_change(steps: Mapping[int, Mapping[int, float]]) -> str:
    """``0.0412 at step 800 -> 0.0350 at step 1600 (-15.0%; steps 1500-1600: -0.4%)``: over the last half of the
    steps, and over the last interval (has it flattened?)."""
    xs = sorted(steps)
    g = {s: stats.row_interval(steps[s]).geomean for s in xs}
    first, last = xs[(len(xs) - 1) // 2], xs[-1]
    prev = xs[-2]
    return (
        f"{g[first]:.4g} at step {first} -> {g[last]:.4g} at step {last} ({g[last] / g[first] - 1:+.1%}; steps "
        f"{prev}-{last}: {g[last] / g[prev] - 1:+.1%})"
    )


def write_csv(path: Path, columns: Sequence[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """The ablation suite's CSV files (tables and curves): ``columns`` in order, one line a record."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_curves(table: str, budget: str, results: list[dict[str, Any]], out_dir: Path) -> tuple[list[Path], list[str]]:
    """``curves-table<T>-<budget>.csv`` (contrasts), ``-rows.csv`` and ``-<score>.png`` in ``out_dir`` and the
    report's section, when some contrast or row has scores at >= 2 steps; else nothing. (Not named ``table<T>-*``:
    :func:`dico.analysis.reports.read_results` reads those as tables.)"""
    from ablations.findings import SCORE_NAMES

    curves, rows = table_curves(table, budget, results)
    rows = {s: {r: st for r, st in by_row.items() if len(st) >= 2} for s, by_row in rows.items()}
    rows = {s: by_row for s, by_row in rows.items() if by_row}
    if not curves and not rows:
        return [], []
    name = f"table{table}-{budget}"
    paths = [out_dir / f"curves-{name}.csv", out_dir / f"curves-{name}-rows.csv"]
    write_csv(paths[0], CURVE_COLUMNS, curve_rows(curves))
    write_csv(paths[1], ROW_COLUMNS, row_curve_rows(rows))
    for score in sorted(rows.keys() | {c.score for c in curves}):
        mine = [c for c in curves if c.score == score]
        paths.append(
            plot_curves(score, SCORE_NAMES[score], mine, rows.get(score, {}), out_dir / f"curves-{name}-{score}.png")
        )
    return paths, curve_lines(curves, rows, SCORE_NAMES, [p.name for p in paths])


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
