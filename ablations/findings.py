"""What a table's runs show: the rank correlation of each score with the paper's FID, the pre-declared paired
contrasts over seeds (:mod:`ablations.stats`) and the speed claim -- the "What the runs show" of a report."""

from __future__ import annotations

import math
from typing import Any

from ablations.rows import TABLES
from dico.models.ablation import paper_row

SCORE_NAMES = {"fid": "FID", "heldout_mse": "held-out MSE"}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


#: The per-seed score of a row: CSV column prefix -> the key of ``result.json``'s ``metrics``. The statistics below
#: are generic over it (a second score, e.g. a held-out loss, is one more entry).
SCORES = {"fid": "frechet_inception_distance", "heldout_mse": "heldout_mse"}
#: How a per-seed score is written in the table (its statistics are of these values; the curves use the same).
PER_SEED_FORMAT = {"fid": "{:.2f}", "heldout_mse": "{:.6f}"}
#: The scores with an effect size in the paper (its FID ratios), so "seeds needed" has a basis; the held-out MSE has
#: none (a ratio of losses is not a ratio of FIDs).
PAPER_EFFECT_SCORES = ("fid",)

#: Pre-declared contrasts (declared before any run, from the paper's claims): (claim, rows as (lower-scoring row,
#: higher-scoring row) by the paper's FID). Table 4: DiCo-S against every swap, in the paper's order.
CONTRASTS: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {
    "3": [
        (
            "U-shape beats isotropic (lower FID)",
            [
                ("DiT (U-shape)", "DiT (iso.)"),
                ("DiT (U-shape)", "DiT (iso.&skip)"),
                ("DiCo (U-shape)", "DiCo (iso.)"),
                ("DiCo (U-shape)", "DiCo (iso.&skip)"),
            ],
        ),
        (
            "DiCo beats DiT at equal budget (lower FID)",
            [
                ("DiCo (iso.)", "DiT (iso.)"),
                ("DiCo (iso.&skip)", "DiT (iso.&skip)"),
                ("DiCo (U-shape)", "DiT (U-shape)"),
            ],
        ),
    ],
    "4": [
        (
            "DiCo-S's parts against each swap, in the paper's order (lower FID first)",
            [
                ("DiCo-S", "GELU->ReLU"),
                ("3x3->5x5 DWC", "DiCo-S"),
                ("3x3->7x7 DWC", "DiCo-S"),
                ("DiCo-S", "w/o CCA"),
                ("DiCo-S", "CCA->SE module"),
                ("DiCo-S", "CCA->Channel Self-Attn"),
                ("DiCo-S", "CM->Self-Attn"),
                ("DiCo-S", "CM->Window Attn"),
                ("DiCo-S", "CM->Focused Linear Attn"),
                ("DiCo-S", "CM->Agent Attn"),
            ],
        ),
    ],
}
SPEED_CLAIM = {
    "3": ["DiT (U-shape)"],
    "4": ["CM->Self-Attn", "CM->Window Attn", "CM->Focused Linear Attn", "CM->Agent Attn"],
}


def per_seed(rows: list[dict[str, Any]], score: str = "fid") -> dict[str, dict[int, float]]:
    """{row name: {seed: score}} from the table rows' ``<score>_seeds`` and ``<score>_per_seed`` columns."""
    out = {}
    for r in rows:
        seeds, values = str(r.get(f"{score}_seeds", "")).split(), str(r.get(f"{score}_per_seed", "")).split()
        if seeds and len(seeds) == len(values):
            out[r["row"]] = {int(s): float(v) for s, v in zip(seeds, values, strict=True)}
    return out


def statistics_lines(table: str, scores: dict[str, dict[int, float]], score: str = "fid") -> list[str]:
    """The per-seed noise, each pre-declared contrast (paired seeds, interval, verdict) and the seeds it would need."""
    from ablations import stats

    paper = {r: paper_row(TABLES[table], r)["fid"] for c in CONTRASTS.get(table, []) for p in c[1] for r in p}
    sd, df = stats.pooled_sd(scores)
    level = f"{1 - stats.ALPHA:.0%}"
    seeds_needed_note = (
        f"Seeds needed: paired seeds a row for {stats.POWER:.0%} power at the paper's own ratio, given the measured "
        f"noise."
    )
    no_effect_note = (
        f"No seeds needed are given: the paper reports no {SCORE_NAMES.get(score, score)}, so there is no effect size "
        f"to power for (its FID ratios are not ratios of this score)."
    )
    lines = [
        f"- Per-seed noise: SD of ln({score}) pooled over the rows with >= 2 seeds: "
        + (f"{sd:.3f} ({df} degrees of freedom)" if sd is not None else "not measured (no row has 2 seeds)"),
        f"- Each claim is a pre-declared paired contrast: the ratio {score}(higher) / {score}(lower) by the paper's "
        f'order, geometric mean over the seeds both rows share, with its two-sided {level} t-interval. "resolved" '
        f"when the interval excludes 1 (false-positive rate {stats.ALPHA:.0%} per contrast on rows that do not "
        f'differ); otherwise "not resolved", whatever the point estimate. '
        + (seeds_needed_note if score in PAPER_EFFECT_SCORES else no_effect_note),
    ]
    resolved, tested = [], []
    for claim, pairs in CONTRASTS.get(table, []):
        lines.append(f"- Paper: {claim}:")
        for better, worse in pairs:
            c = stats.paired_contrast(better, scores.get(better, {}), worse, scores.get(worse, {}))
            effect = math.log(paper[worse] / paper[better])
            need = stats.seeds_needed(effect, sd) if sd else None
            needed = (
                ""
                if sd is None or score not in PAPER_EFFECT_SCORES
                else f"; paper ratio {math.exp(effect):.3f} needs "
                + (f"{need} paired seeds" if need else f"> {stats.MAX_SEEDS} paired seeds")
            )
            lines.append(f"  - {c.describe()}{needed}")
            tested += [c] if c.p_value is not None else []
            if c.resolved:
                resolved.append(c)
    lines.append(
        f"- Resolved: {len(resolved)} contrast(s)"
        + (
            ": " + "; ".join(f"{c.worse} vs {c.better} ({'agrees' if c.agrees else 'disagrees'})" for c in resolved)
            if resolved
            else ": none; no ordering of these rows is claimed from these runs."
        )
    )
    if tested:
        family = stats.holm(tested)
        lines.append(
            f"- Of {len(tested)} tested contrasts about {stats.ALPHA * len(tested):.1f} would resolve by chance if no "
            f"row differed. Held to {stats.ALPHA:.0%} for the whole family (Holm): "
            + (
                "; ".join(f"{c.worse} vs {c.better} (p = {c.p_value:.2g})" for c in family) + " resolved."
                if family
                else "none resolves."
            )
        )
    return lines


def findings(table: str, rows: list[dict[str, Any]]) -> list[str]:
    """The rank correlation with the paper's FID column, the pre-declared contrasts and the speed claim."""
    by_row = {r["row"]: r for r in rows}
    lines = []
    for score in [s for s in SCORES if any(r[s] != "" for r in rows)] or ["fid"]:
        scored = [r for r in rows if r[score] != ""]
        if len(scored) >= 3:
            rho = spearman([float(r[score]) for r in scored], [float(r["paper_fid"]) for r in scored])
            lines.append(
                f"- Spearman rank correlation of our {SCORE_NAMES[score]} with the paper's FID over {len(scored)} "
                f"rows: {rho:+.2f} (a description of the means, not a test: it carries the seed noise below)"
            )
        else:
            lines.append(
                f"- Spearman rank correlation ({SCORE_NAMES[score]}): needs >= 3 scored rows ({len(scored)} so far)"
            )
        lines += statistics_lines(table, per_seed(rows, score), score)
    speed = [(n, by_row[n]["throughput_ratio"]) for n in SPEED_CLAIM[table] if by_row[n]["throughput_ratio"] != ""]
    if speed:
        slower = [n for n, r in speed if float(r) < 1]
        lines.append(
            f"- Paper: the conv module is faster than every attention swap. Proxy (throughput / DiCo-S, interleaved): "
            f"{len(slower)} of {len(speed)} attention rows slower: "
            + ", ".join(f"{n} {float(r):.3f}x" for n, r in speed)
        )
    return lines
