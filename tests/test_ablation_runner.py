"""The ablation runner: structure and smoke budgets, resumability, tables beside the paper's."""

from __future__ import annotations

import csv
import json

import pytest

from ablations.run import BUDGETS, parse, run
from dico.data import ExtractConfig, extract_latents
from dico.models.ablation import ABLATION_ROWS, TABLE4


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_structure_budget_reports_counts_beside_the_paper(tmp_path, monkeypatch):
    monkeypatch.setitem(BUDGETS, "structure", BUDGETS["smoke"].__class__(train=False, throughput_batch=4,
                                                                         throughput_iters=1))  # fmt: skip
    args = parse(["--table", "4", "--rows", "DiCo-S", "w/o CCA", "--out", str(tmp_path / "runs"),
                  "--results", str(tmp_path / "results"), "--device", "cpu"])  # fmt: skip
    run(args)
    rows = read_csv(tmp_path / "results" / "table4-structure.csv")
    assert [r["row"] for r in rows] == ["DiCo-S", "w/o CCA"]
    for r in rows:
        entry = ABLATION_ROWS[TABLE4, r["row"]]
        assert float(r["paper_params_M"]) == entry.paper["params_M"]
        assert abs(float(r["params_dev_%"])) < 1 and abs(float(r["gflops_dev_%"])) < 1
    assert float(rows[0]["throughput_ratio"]) == 1.0 and float(rows[0]["paper_throughput_ratio"]) == 1.0
    md = (tmp_path / "results" / "table4-structure.md").read_text()
    assert "| w/o CCA | `DiCo-S-noCCA` |" in md and (tmp_path / "results" / "table4-structure.png").exists()


@pytest.fixture(scope="module")
def latents(tmp_path_factory, image_folder, tiny_vae_dir):
    out = tmp_path_factory.mktemp("ablation-latents")
    extract_latents(ExtractConfig(str(image_folder), str(out), image_size=16, vae=str(tiny_vae_dir), num_workers=0,
                                  progress=False))  # fmt: skip
    return out


def test_smoke_budget_trains_evaluates_and_resumes(tmp_path, latents, image_folder, inception_weights, capsys):
    argv = [
        "--table",
        "3",
        "--rows",
        "DiCo (U-shape)",
        "DiT (iso.)",
        "--budget",
        "smoke",
        "--data",
        str(latents),
        "--reference",
        str(tmp_path / "ref.npz"),
        "--reference-source",
        str(image_folder),
        "--inception-weights",
        str(inception_weights),
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--num-workers",
        "0",
        "--loggers",
        "csv",
        "--device",
        "cpu",
    ]
    first = run(parse(argv))
    for result in first:
        assert result["steps"] == BUDGETS["smoke"].max_steps and result["eval_samples"] == 32
        assert set(result["metrics"]) >= {"frechet_inception_distance", "inception_score_mean", "precision"}
    rows = read_csv(tmp_path / "results" / "table3-smoke.csv")
    assert [r["row"] for r in rows] == ["DiT (iso.)", "DiCo (U-shape)"] and all(r["fid"] for r in rows)
    assert "ours from 32 samples" in (tmp_path / "results" / "table3-smoke.md").read_text()

    # finished rows are skipped; an interrupted row resumes from its last checkpoint
    dit_dir = tmp_path / "runs" / "table3" / "smoke" / "dit-iso"
    (dit_dir / "result.json").unlink()
    capsys.readouterr()
    second = run(parse(argv))
    out = capsys.readouterr().out
    assert "DiCo (U-shape): finished earlier" in out and "DiT (iso.): finished earlier" not in out
    assert json.loads((dit_dir / "result.json").read_text())["steps"] == BUDGETS["smoke"].max_steps
    assert [r["row"] for r in second] == [r["row"] for r in first]


def test_training_budgets_need_data():
    with pytest.raises(SystemExit, match="--data"):
        run(parse(["--table", "4", "--budget", "smoke"]))


def test_throughput_batch_and_iters_override_the_budget(tmp_path):
    out, results = str(tmp_path / "runs"), str(tmp_path / "results")
    args = parse(["--table", "4", "--rows", "DiCo-S", "--out", out, "--results", results, "--device", "cpu",
                  "--throughput-batch", "2", "--throughput-iters", "1"])  # fmt: skip
    [result] = run(args)
    assert result["throughput_batch"] == 2 and result["budget_settings"]["throughput_iters"] == 1
    assert BUDGETS["structure"].throughput_batch == 64  # the budget itself is unchanged
    assert "at batch 2 on cpu" in (tmp_path / "results" / "table4-structure.md").read_text()
