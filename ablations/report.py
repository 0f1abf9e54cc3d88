"""Ablation tables side by side with the paper: Markdown, CSV and an FID-vs-throughput plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

COLUMNS = [
    "row", "model", "params_M", "paper_params_M", "params_dev_%", "gflops", "paper_gflops", "gflops_dev_%",
    "throughput", "throughput_ratio", "paper_throughput", "paper_throughput_ratio", "fid", "paper_fid", "is",
    "paper_is", "precision", "paper_precision", "recall", "paper_recall", "eval_samples", "train_steps", "note",
]  # fmt: skip


def _dev(ours: float, paper: float) -> float:
    return 100.0 * (ours / paper - 1.0)


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per row; throughputs also as ratios to the DiCo-S (U-shape) row, ours and the paper's."""
    reference = next((r for r in results if r["model"] == "DiCo-S"), None)
    ours_ref = reference["throughput"] if reference else math.nan
    paper_ref = reference["paper"]["throughput"] if reference else math.nan
    out = []
    for r in results:
        p, m = r["paper"], r.get("metrics", {})
        params_m, gflops = r["params"] / 1e6, r["gmacs"]
        out.append({
            "row": r["row"], "model": r["model"],
            "params_M": round(params_m, 2), "paper_params_M": p["params_M"],
            "params_dev_%": round(_dev(params_m, p["params_M"]), 2),
            "gflops": round(gflops, 3), "paper_gflops": p["gflops"],
            "gflops_dev_%": round(_dev(gflops, p["gflops"]), 2),
            "throughput": round(r["throughput"], 1), "throughput_ratio": round(r["throughput"] / ours_ref, 3),
            "paper_throughput": p["throughput"], "paper_throughput_ratio": round(p["throughput"] / paper_ref, 3),
            "fid": _round(m.get("frechet_inception_distance")), "paper_fid": p["fid"],
            "is": _round(m.get("inception_score_mean")), "paper_is": p["is"],
            "precision": _round(m.get("precision"), 3), "paper_precision": p["precision"],
            "recall": _round(m.get("recall"), 3), "paper_recall": p["recall"],
            "eval_samples": r.get("eval_samples", ""), "train_steps": r.get("steps", ""),
            "note": r["note"] + (f" Deviation: {r['deviation']['family']}." if r.get("deviation") else ""),
        })  # fmt: skip
    return out


def _round(value: float | None, digits: int = 2) -> float | str:
    return "" if value is None else round(value, digits)


def write_report(results: list[dict[str, Any]], out_dir: Path, name: str) -> list[Path]:
    """``<name>.csv``, ``<name>.md`` and ``<name>.png`` (FID, or Gflops without training, vs throughput ratio)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results)
    csv_path = out_dir / f"{name}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown(rows, results))
    return [csv_path, md_path, plot(rows, out_dir / f"{name}.png")]


def markdown(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    device = results[0]["device"] if results else "?"
    samples = {r["eval_samples"] for r in rows if r["eval_samples"] != ""}
    lines = [
        f"Ours beside the paper's. Throughput: images/s of an fp32 forward at batch {results[0]['throughput_batch']}"
        f" on {device} (the paper: A100, batch 64), and as a ratio to DiCo-S, which compares across devices.",
        "FID/IS/precision/recall: "
        + (
            f"ours from {', '.join(map(str, sorted(samples)))} samples (the paper: 50K)."
            if samples
            else "not trained at this budget."
        ),
        "",
        "| row | model | params M (ours / paper) | Gflops (ours / paper) | throughput ratio (ours / paper) "
        "| FID (ours / paper) | IS | precision | recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | `{r['model']}` | {r['params_M']} / {r['paper_params_M']} ({r['params_dev_%']:+.1f}%) "
            f"| {r['gflops']} / {r['paper_gflops']} ({r['gflops_dev_%']:+.1f}%) "
            f"| {r['throughput_ratio']} / {r['paper_throughput_ratio']} | {r['fid'] or '-'} / {r['paper_fid']} "
            f"| {r['is'] or '-'} / {r['paper_is']} | {r['precision'] or '-'} / {r['paper_precision']} "
            f"| {r['recall'] or '-'} / {r['paper_recall']} |"
        )
    notes = [f"- {r['row']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join([*lines, "", "Shapes and deviations:", *notes, ""])


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    trained = all(r["fid"] != "" for r in rows)
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for r in rows:
        ours_y = r["fid"] if trained else r["gflops"]
        paper_y = r["paper_fid"] if trained else r["paper_gflops"]
        ax.scatter(r["paper_throughput_ratio"], paper_y, marker="o", color="tab:gray")
        ax.scatter(r["throughput_ratio"], ours_y, marker="x", color="tab:red")
        ax.annotate(r["row"], (r["throughput_ratio"], ours_y), fontsize=7)
    ax.set_xlabel("throughput / DiCo-S throughput")
    ax.set_ylabel("FID" if trained else "Gflops")
    ax.set_title("ours (x) vs paper (o)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
