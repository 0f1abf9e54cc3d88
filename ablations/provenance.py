"""What made a result row: the code (commit, dirty or not), the config files (sha256), the seed, the command-line
overrides, and the hashes of the FID's feature extractor and reference; and which finished runs a table may use.

A run records the code state each time it starts (``<run>/code.json``: a resumed run may span commits) and
:func:`provenance` adds the rest to ``result.json`` when it finishes. :func:`select_runs` keeps, for ``collect``, the
runs of the requested seeds made by the configs as they are now (same files, same overrides), and says why it left
each other run out.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

from ablations.rows import ROOT, Row, canonical, rows_of
from dico.runtime import code_state

#: the table overlays name the wandb group only: a model trained for Table 3 serves Table 4 (runs are shared)
LOGGING_ONLY = ("ablations/configs/table3.yaml", "ablations/configs/table4.yaml")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_start(run_dir: Path) -> None:
    """Append this start's code state to ``<run>/code.json``."""
    path = run_dir / "code.json"
    starts = json.loads(path.read_text()) if path.exists() else []
    starts.append({**code_state(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    tmp = path.with_name("code.json.tmp")
    tmp.write_text(json.dumps(starts, indent=1))
    tmp.replace(path)


def config_hashes(row: Row) -> dict[str, str]:
    """{config file relative to the checkout: sha256} of the files that compose the row."""
    return {str(p.relative_to(ROOT)): sha256(p) for p in row.configs()}


def provenance(row: Row, run_dir: Path, overrides: list[str], record: dict[str, Any] | None) -> dict[str, Any]:
    """The row's provenance for ``result.json``; ``record``: its evaluation record (None without training)."""
    starts = json.loads((run_dir / "code.json").read_text()) if (run_dir / "code.json").exists() else []
    now = code_state()
    commits = list(dict.fromkeys([*(s["commit"] for s in starts), now["commit"]]))
    out: dict[str, Any] = {
        "commit": commits[0] if len(commits) == 1 else "mixed",
        "commits": commits,  # every commit that trained or scored the row, in order
        "dirty": any(s.get("dirty") for s in [*starts, now]),
        "changed": sorted({f for s in [*starts, now] for f in s.get("changed", [])}),
        "configs": config_hashes(row),
        "seed": row.seed,
        "overrides": list(overrides),
    }
    if record is not None:
        reference = record.get("reference") or {}
        out.update(
            feature_extractor=record.get("feature_extractor"),
            feature_extractor_sha256=reference.get("weights_sha256"),
            reference_sha256=record.get("reference_sha256"),
        )
    return out


def select_runs(
    results: list[dict[str, Any]], table: str, budget: str, seeds: list[int] | None, overrides: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the runs a table uses, one line per run left out and why): the requested seeds (all when None), made by the
    config files as they are now (the table overlays aside: they name the wandb group) and the same overrides."""
    rows = {canonical(r.model): r for r in rows_of(table, budget)}
    kept, left = [], []
    for res in results:
        name = f"{res['model']} seed {res['seed']}"
        prov = res.get("provenance")
        if seeds is not None and res["seed"] not in seeds:
            left.append(f"{name}: seed not requested ({' '.join(map(str, seeds))})")
            continue
        if not prov:
            left.append(f"{name}: no provenance (made by an older runner): its configs cannot be checked")
            continue
        row = Row(res["table"], rows[canonical(res["model"])].row, res["model"], budget, res["seed"])
        now = {k: v for k, v in config_hashes(row).items() if k not in LOGGING_ONLY}
        then = {k: v for k, v in prov["configs"].items() if k not in LOGGING_ONLY}
        if now != then:
            changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
            left.append(f"{name}: made by other versions of {', '.join(changed)}")
            continue
        if prov.get("overrides", []) != list(overrides):
            left.append(f"{name}: made with the overrides {prov.get('overrides')} (asked: {list(overrides)})")
            continue
        kept.append(res)
    return kept, left


def _distinct(values: Any) -> str:
    return " ".join(dict.fromkeys(v for v in values if v))


def provenance_cells(runs: list[dict[str, Any]]) -> dict[str, str]:
    """The row's provenance columns over its runs (distinct values, space-separated; empty for runs without it):
    commits (``+dirty`` when tracked files differed), a digest of the config files' sha256s, and the first 16 hex
    digits of the feature extractor's weights and of the FID reference."""
    provs = [r["provenance"] for r in runs if r.get("provenance")]
    digest = [
        hashlib.sha256(
            json.dumps({k: v for k, v in sorted(p["configs"].items()) if k not in LOGGING_ONLY}).encode()
        ).hexdigest()[:16]
        for p in provs
    ]
    return {
        "commit": _distinct(c[:12] + ("+dirty" if p["dirty"] else "") for p in provs for c in p["commits"]),
        "config_sha256": _distinct(digest),
        "feature_extractor_sha256": _distinct((p.get("feature_extractor_sha256") or "")[:16] for p in provs),
        "reference_sha256": _distinct((p.get("reference_sha256") or "")[:16] for p in provs),
    }


def provenance_lines(results: list[dict[str, Any]], left_out: list[str]) -> list[str]:
    """What made the runs of the table, and what ``collect`` left out."""
    provs = [r["provenance"] for r in results if r.get("provenance")]
    lines = ["## Provenance", ""]
    if len(provs) < len(results):
        lines.append(f"- {len(results) - len(provs)} run(s) carry no provenance (made by an older runner).")
    if provs:
        commits = dict.fromkeys(c for p in provs for c in p["commits"])
        dirty = sorted({f for p in provs for f in p.get("changed", [])})
        lines.append(
            f"- Commit(s): {', '.join(f'`{c}`' for c in commits)}"
            + (
                f"; tracked files differed from the commit in some runs: {', '.join(dirty) or '?'}"
                if any(p["dirty"] for p in provs)
                else "; clean trees"
            )
        )
        files: dict[str, set[str]] = {}
        for p in provs:
            for path, digest in p["configs"].items():
                files.setdefault(path, set()).add(digest)
        lines.append(
            "- Config files (sha256): " + "; ".join(f"`{f}` {' '.join(sorted(d))}" for f, d in sorted(files.items()))
        )
        for key, label in (
            ("feature_extractor_sha256", "Feature extractor weights"),
            ("reference_sha256", "FID reference"),
        ):
            values = sorted({p[key] for p in provs if p.get(key)})
            warn = " (MORE THAN ONE: these FIDs are not comparable)" if len(values) > 1 else ""
            unscored = sum(not p.get(key) for p in provs)
            missing = f" ({unscored} run(s) without an FID)" if unscored and values else ""
            lines.append(f"- {label} (sha256): {', '.join(values) or '-'}{warn}{missing}")
        overrides = sorted({" ".join(p.get("overrides", [])) for p in provs})
        lines.append("- Command-line overrides: " + ("; ".join(f"`{o}`" for o in overrides if o) or "none"))
    if left_out:
        lines += ["- Left out by `collect`:", *(f"  - {line}" for line in left_out)]
    return [*lines, ""]


#: an absolute path of two or more parts, not inside a word, a URL or a relative path (``w/o``, ``https://a/b``)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/[\w.+~-]+(?:/[\w.+~-]*)+")
_OPTION_PATH = re.compile(r"(--(\w[\w-]*)[ =])" + _ABSOLUTE_PATH.pattern)


def portable(text: str, results: list[dict[str, Any]]) -> str:
    """``text`` without this machine's paths: the checkout's prefix dropped, each run folder's ``--out`` as
    ``<out>`` (a run folder is ``<out>/<budget>/<model>/seed<k>``), then any other absolute path as the option that
    names it (``--results /scratch/x`` -> ``--results <results>``) or ``<path>``."""
    outs = {str(Path(r["run_dir"]).parents[2]) for r in results if Path(r.get("run_dir", "")).is_absolute()}
    for out in sorted(outs, key=len, reverse=True):
        if out != str(ROOT / "ablations" / "runs"):
            text = re.sub(re.escape(out) + r"(?=/|\s|[`'\")]|$)", "<out>", text, flags=re.M)
    text = text.replace(f"{ROOT}/", "")
    return _ABSOLUTE_PATH.sub("<path>", _OPTION_PATH.sub(r"\1<\2>", text))
