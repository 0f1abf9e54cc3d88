"""Provenance of the ablation results: what made each row (commit, config files, seed, overrides, the FID's feature
extractor and reference), which runs `collect` uses and what it leaves out, and reports without machine paths."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess

from ablations import provenance, report, run
from ablations.rows import ROOT, Row, rows_of, slug

RECORD = {"feature_extractor": "dico-digits", "reference": {"weights_sha256": "f" * 64}, "reference_sha256": "r" * 64}


def test_a_result_names_its_commit_configs_seed_and_fid_hashes(tmp_path):
    row = rows_of("4", "proxy", ["w/o CCA"], [3])[0]
    run_dir = row.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    provenance.record_start(run_dir)
    prov = provenance.provenance(row, run_dir, ["--trainer.max_steps", "30"], RECORD)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    porcelain = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout
    assert prov["commit"] == head and prov["commits"] == [head] and prov["dirty"] == bool(porcelain.strip())
    expected = {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in row.configs()}
    assert prov["configs"] == expected and len(expected) == 4
    assert "ablations/configs/rows/digits/dico-s-nocca.yaml" in expected
    assert prov["seed"] == 3 and prov["overrides"] == ["--trainer.max_steps", "30"]
    assert prov["feature_extractor_sha256"] == "f" * 64 and prov["reference_sha256"] == "r" * 64
    # a run resumed on another commit says so
    starts = json.loads((run_dir / "code.json").read_text())
    (run_dir / "code.json").write_text(json.dumps([{**starts[0], "commit": "0" * 40}, *starts]))
    mixed = provenance.provenance(row, run_dir, [], None)
    assert mixed["commit"] == "mixed" and mixed["commits"] == ["0" * 40, head]


def result(row: Row, out, prov: dict | None, fid: float = 50.0) -> dict:
    return {
        "table": row.table,
        "row": row.row,
        "model": row.model,
        "budget": row.budget,
        "seed": row.seed,
        "model_kwargs": {},
        "note": "",
        "shape": "s",
        "deviation": "",
        "run_dir": str(row.run_dir(out)),
        "command": f"python cli.py fit --trainer.default_root_dir {row.run_dir(out)}",
        "trained_size": {"params": 1000, "gmacs": 0.01},
        "throughput_ratio": 1.0,
        "device": "cpu",
        "metrics": {"frechet_inception_distance": fid},
        "wandb": f"wandb sync {row.run_dir(out)}/wandb/x",
        "provenance": prov,
    }


def test_collect_keeps_the_requested_seeds_made_by_todays_configs_and_says_what_it_left_out(tmp_path, capsys):
    out = tmp_path / "runs"
    rows = {s: rows_of("4", "proxy", ["DiCo-S", "w/o CCA"], [s]) for s in (0, 1, 2)}
    here = {"commits": ["a" * 40], "dirty": False, "overrides": [], **RECORD_HASHES}
    results = []
    for seed, (dico, nocca) in rows.items():
        results += [
            result(dico, out, {**here, "configs": provenance.config_hashes(dico)}, 50 + seed),
            result(nocca, out, {**here, "configs": provenance.config_hashes(nocca)}, 55 + seed),
        ]
    # seed 1 of w/o CCA: its row overlay has changed since; seed 2 of DiCo-S: no provenance; seed 0 of w/o CCA was
    # trained for Table 3's wandb group (table3.yaml): the same training, kept
    results[3]["provenance"]["configs"] = {
        **results[3]["provenance"]["configs"],
        "ablations/configs/rows/digits/dico-s-nocca.yaml": "0" * 64,
    }
    results[4]["provenance"] = None
    results[1]["provenance"]["configs"] = provenance.config_hashes(Row("3", "x", "DiCo-S-noCCA", "proxy", 0))
    for r in results:
        d = out / "proxy" / slug(r["model"]) / f"seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
    capsys.readouterr()
    assert (
        run.main(
            [
                "collect",
                "--table",
                "4",
                "--budget",
                "proxy",
                "--seeds",
                "0",
                "1",
                "2",
                "--out",
                str(out),
                "--results",
                str(tmp_path / "res"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "left out: DiCo-S-noCCA seed 1: made by other versions of ablations/configs/rows/digits/dico-s-nocca.yaml"
        in printed
    )
    assert "left out: DiCo-S seed 2: no provenance" in printed
    with open(tmp_path / "res" / "table4-proxy.csv") as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    assert table["DiCo-S"]["fid_seeds"] == "0 1" and table["w/o CCA"]["fid_seeds"] == "0 2"
    assert table["DiCo-S"]["commit"] == "a" * 12 and table["DiCo-S"]["feature_extractor_sha256"] == "f" * 16
    md = (tmp_path / "res" / "table4-proxy.md").read_text()
    assert "- Left out by `collect`:" in md and "DiCo-S seed 2: no provenance" in md
    assert f"Feature extractor weights (sha256): {'f' * 64}" in md
    # only the requested seeds
    assert (
        run.main(
            [
                "collect",
                "--table",
                "4",
                "--budget",
                "proxy",
                "--seeds",
                "2",
                "--out",
                str(out),
                "--results",
                str(tmp_path / "res"),
            ]
        )
        == 0
    )
    assert "DiCo-S seed 0: seed not requested (2)" in capsys.readouterr().out
    # and overrides: runs made with `-- --trainer.max_steps 30` are not the budget's
    assert (
        run.main(
            [
                "collect",
                "--table",
                "4",
                "--budget",
                "proxy",
                "--out",
                str(out),
                "--results",
                str(tmp_path / "res"),
                "--",
                "--trainer.max_steps",
                "30",
            ]
        )
        == 0
    )
    assert "made with the overrides [] (asked: ['--trainer.max_steps', '30'])" in capsys.readouterr().out


RECORD_HASHES = {"feature_extractor_sha256": "f" * 64, "reference_sha256": "r" * 64}


def test_reports_hold_no_machine_paths(tmp_path):
    out = tmp_path / "somewhere" / "runs"
    [row] = rows_of("4", "proxy", ["DiCo-S"])
    paths = report.write_report("4", "proxy", [result(row, out, None)], tmp_path / "res", "python ablations/run.py")
    for path in paths[:2]:
        text = path.read_text()
        assert str(tmp_path) not in text and str(ROOT) not in text
    assert "<out>/proxy/dico-s/seed0" in paths[1].read_text()


def test_restat_of_the_committed_proxy_tables_is_what_is_committed(tmp_path, capsys):
    """``run.py restat`` rewrites an older runner's table with today's statistics: run on the committed proxy tables
    (twice) it gives them back byte for byte, with its note once, so the committed ones are today's statistics."""
    import shutil

    for name in ("table3-proxy.csv", "table3-proxy.md", "table4-proxy.csv", "table4-proxy.md"):
        shutil.copy(ROOT / "ablations" / "results" / name, tmp_path / name)
    for _ in range(2):
        for table in ("3", "4"):
            assert run.main(["restat", "--table", table, "--budget", "proxy", "--results", str(tmp_path)]) == 0
    for name in ("table3-proxy.csv", "table3-proxy.md", "table4-proxy.csv", "table4-proxy.md"):
        assert (tmp_path / name).read_text() == (ROOT / "ablations" / "results" / name).read_text(), name
    assert (tmp_path / "table4-proxy.md").read_text().count("older runner (`python ablations/run.py restat`)") == 1


def test_fid_hashes_differ_only_between_runs_that_have_an_fid():
    """A run not yet scored (crops16's patch FID comes after training) is counted, not taken for a second hash."""

    def prov(extractor: str | None) -> dict:
        return {"commits": ["a" * 40], "dirty": False, "configs": {}, "feature_extractor_sha256": extractor}

    def extractor_line(*extractors: str | None) -> str:
        lines = provenance.provenance_lines([{"provenance": prov(e)} for e in extractors], [])
        return next(line for line in lines if line.startswith("- Feature extractor weights"))

    assert (
        extractor_line("e" * 64, None, "e" * 64)
        == f"- Feature extractor weights (sha256): {'e' * 64} (1 run(s) without an FID)"
    )
    assert "MORE THAN ONE" in extractor_line("e" * 64, None, "d" * 64)
    assert extractor_line(None, None) == "- Feature extractor weights (sha256): -"
