"""The crops16 budget's patch FID: the second score of a finished row, beside its held-out denoising loss.

A row's EMA weights sample ``num_samples`` 16x16 crops (``python cli.py sample``: iDDPM, 50 steps, no guidance,
the same seed and balanced labels for every row and seed, so rows pair on their sampling noise too), and ``python
cli.py evaluate`` scores them against the training crops in the features of the committed crop classifier
(``dico-crops16``, :mod:`dico.evaluation.crops`). The FID is a Frechet distance of 64-d features on 640 samples:
biased upwards by the sample count and not comparable with any Inception FID, but the same protocol for every
row, so its ratios between rows are what the statistics test. The score lands in the row's ``result.json``
(``metrics.frechet_inception_distance`` and the evaluation's other metrics; ``patch_fid``: the sampling settings,
the samples' sha256, the commit that scored it), so ``collect`` treats it as the row's FID.

    python ablations/run.py patch-fid --table 4 --budget crops16 --out runs/ablations  # rows finished without it
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ablations.budgets import ROOT, budget_of


def settings_of(budget: str) -> dict[str, Any]:
    """How the budget's rows are sampled for the patch FID (``cli.py sample`` options) and which features score them
    (its record's ``patch_fid``); an error for a budget without one."""
    settings = budget_of(budget).patch_fid
    if settings is None:
        raise SystemExit(f"the {budget} budget has no patch FID (ablations/budgets.py: its record's patch_fid)")
    return settings


def reference_path(out: Path, budget: str) -> Path:
    return out / budget / "patch-fid-reference.npz"


def _run(command: list[str]) -> None:
    print(f"[ablations] python {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def prepare_reference(config: dict[str, Any], out: Path, budget: str) -> Path:
    """The reference statistics of the rows' training crops (their data as the composed ``config`` builds it),
    written once under ``out``: the crops as an ADM batch, then ``python cli.py reference``."""
    import inspect

    import torch

    from dico.data.image_crops import image_crops
    from dico.evaluation.images import save_npz, to_uint8

    path = reference_path(out, budget)
    if path.exists():
        return path
    init = config["data"].get("init_args") or {}
    crop_args = inspect.signature(image_crops).parameters  # the data module's crop options are image_crops's
    crops = image_crops(**{k: (tuple(v) if k == "images" else v) for k, v in init.items() if k in crop_args})
    images = save_npz(
        out / budget / "patch-fid-train-crops.npz", to_uint8(torch.from_numpy(crops.train_x)), crops.train_y
    )
    _run([sys.executable, str(ROOT / "cli.py"), "reference", "--source", str(images), "--out", str(path),
          "--feature_extractor", settings_of(budget)["feature_extractor"],
          "--max_features", str(settings_of(budget)["reference_features_kept"])])  # fmt: skip  # argv: flag/value pairs
    return path


def score_run(run_dir: Path, budget: str, reference: Path) -> dict[str, Any]:
    """Sample the run's ``last.ckpt`` (EMA) and score the samples: the ``evaluate`` record."""
    settings = settings_of(budget)
    folder = run_dir / "patch_fid"
    sample = [f"--{k}={v}" for k, v in settings["sample"].items()]
    _run([sys.executable, str(ROOT / "cli.py"), "sample", "--ckpt", str(run_dir / "checkpoints" / "last.ckpt"),
          "--out", str(folder), "--devices", "1", *sample])  # fmt: skip  # argv: flag/value pairs
    _run([sys.executable, str(ROOT / "cli.py"), "evaluate", "--samples", str(folder / "samples.npz"),
          "--reference", str(reference), "--feature_extractor", settings["feature_extractor"],
          "--out", str(folder / "record.json")])  # fmt: skip  # argv: flag/value pairs
    return json.loads((folder / "record.json").read_text())


def add_to_result(result_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The evaluation ``record`` merged into ``result.json`` (atomically): its metrics, settings and provenance."""
    from ablations.provenance import code_state

    result = json.loads(result_path.read_text())
    state = code_state()
    result["metrics"] = {**result.get("metrics", {}), **record["metrics"]}
    result["patch_fid"] = {
        "settings": record["settings"],
        "samples_sha256": record["samples_sha256"],
        "count": record["count"],
        "feature_extractor": record["feature_extractor"],
        "scored_by": state,
    }
    prov = result.setdefault("provenance", {})
    prov["commits"] = list(dict.fromkeys([*prov.get("commits", []), state["commit"]]))
    prov["commit"] = prov["commits"][0] if len(prov["commits"]) == 1 else "mixed"
    prov["dirty"] = bool(prov.get("dirty")) or bool(state["dirty"])
    prov["changed"] = sorted({*prov.get("changed", []), *state["changed"]})
    prov.update(
        feature_extractor=record["feature_extractor"],
        feature_extractor_sha256=record["reference"]["weights_sha256"],
        reference_sha256=record["reference_sha256"],
    )
    tmp = result_path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(result_path)
    return result


def has_patch_fid(result_path: Path) -> bool:
    return "patch_fid" in json.loads(result_path.read_text())


def score_finished(run_dirs: list[Path], config: dict[str, Any], out: Path, budget: str) -> list[Path]:
    """Add the patch FID to every finished run in ``run_dirs`` that has none; returns the runs it failed on (each
    named with the fix; the others are still scored, and the row's training is untouched)."""
    todo = [d for d in run_dirs if (d / "result.json").exists() and not has_patch_fid(d / "result.json")]
    if not todo:
        return []
    reference = prepare_reference(config, out, budget)
    failed = []
    for i, run_dir in enumerate(todo, 1):
        print(f"[ablations] patch FID {i}/{len(todo)}: {run_dir}", flush=True)
        try:
            add_to_result(run_dir / "result.json", score_run(run_dir, budget, reference))
        except subprocess.CalledProcessError as e:
            fix = f"python ablations/run.py patch-fid --table T --budget {budget} --out {out}"
            print(
                f"[ablations] patch FID of {run_dir} failed ({e}); its training is kept: rerun `{fix}` once fixed",
                flush=True,
            )
            failed.append(run_dir)
    return failed
