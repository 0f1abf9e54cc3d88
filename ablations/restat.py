"""``python ablations/run.py restat``: a table written by an older runner, rewritten with today's statistics."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ablations.curves import write_csv
from ablations.findings import findings
from ablations.report import COLUMNS, SCORE_NOTE, table_lines, with_intervals
from ablations.rows import canonical

LEGACY_NOTE = (
    "> Rebuilt from the committed CSV and Markdown of an older runner (`python ablations/run.py restat`): the "
    "runs' folders are gone, and these rows LACK PROVENANCE: no commit, config hashes, feature-extractor or reference "
    "hashes were recorded (the digits classifier behind this FID was trained at run time, with weights that depended "
    "on the thread count). The per-seed FIDs and the seed numbers are the recorded ones; the statistics are "
    "recomputed from them."
)
_RUN_LINE = re.compile(r"^- `(?P<model>[^`]+)` seed (?P<seed>\d+) \(")
_LEGACY_PARAGRAPH = re.compile(r"\n\n> Rebuilt from the committed CSV and Markdown of an older runner[^\n]*(?=\n\n)")
_ABSOLUTE_RUNS = re.compile(r"/[^\s()`]*/ablations/runs/")


def restat(table: str, budget: str, results_dir: Path) -> list[Path]:
    """Rewrite ``table<T>-<budget>.{csv,md}`` of an older runner with today's statistics: the seed numbers from the
    Markdown's run list, intervals and contrasts from the per-seed FIDs, absolute run paths made relative. The other
    measured columns are kept as recorded."""
    name = f"table{table}-{budget}"
    csv_path, md_path = results_dir / f"{name}.csv", results_dir / f"{name}.md"
    text = md_path.read_text()
    seeds: dict[str, list[int]] = {}
    for line in text.splitlines():
        if m := _RUN_LINE.match(line):
            seeds.setdefault(canonical(m["model"]), []).append(int(m["seed"]))
    with open(csv_path, newline="") as f:
        old = list(csv.DictReader(f))
    rows = []
    for r in old:
        rec = {c: r.get(c, "") for c in COLUMNS}
        values = rec["fid_per_seed"].split()
        known = sorted(set(seeds.get(canonical(rec["model"]), [])))
        if values and not rec["fid_seeds"] and len(known) == len(values):  # listed by seed (the old runner sorted)
            rec["fid_seeds"] = " ".join(map(str, known))
        rec["wandb"] = _ABSOLUTE_RUNS.sub("ablations/runs/", rec["wandb"])
        rows.append(with_intervals(rec))
    write_csv(csv_path, COLUMNS, rows)
    head, rest = text.split("\n| row |", 1)
    rest = rest[rest.index("\n\n") :]  # after the table
    head = re.sub(
        r"FID: mean over seeds; spread: max - min over seeds\.|FID: geometric mean.*the seeds\.", SCORE_NOTE, head
    )
    head = _LEGACY_PARAGRAPH.sub("", head)  # the note as an earlier restat wrote it
    head = head.replace("\n\n> ", f"\n\n{LEGACY_NOTE}\n\n> ", 1)
    before, after = rest.split("## What the runs show", 1)
    after = after[after.index("\nOpen question") :] if "\nOpen question" in after else after[after.index("\n## ") :]
    body = "\n".join(["", *table_lines(rows)]) + before + "## What the runs show\n\n" + "\n".join(findings(table, rows))
    md_path.write_text(_ABSOLUTE_RUNS.sub("ablations/runs/", head + body + "\n" + after))
    return [csv_path, md_path]
