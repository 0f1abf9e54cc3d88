"""End to end: the README's quickstart trains a real digits model that draws the requested digits; sampling
from its checkpoint (the ``sample`` tool and ``predict``) is reproducible and resumable."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cli
from dico.evaluation import SampleSet
from dico.evaluation.digits import class_accuracy, train_digits_classifier
from tests.conftest import QUICKSTART

pytestmark = pytest.mark.slow  # (one module: under pytest-xdist one worker trains the model its tests share)

# CI-sized: 400 of the README's 600 steps (the periodic evaluation runs at 0, 300 and at the end, 400), and every
# sampler (evaluations, grids, final samples) at 20 of its 50 DDIM steps.
STEPS = 400
SAMPLING_STEPS = 20


def run(cwd: Path, *args: str) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert cli.main(list(args)) == 0
    finally:
        os.chdir(old)


def uniform_labels(count: int, batch_size: int, seed: int) -> list[int]:
    """The labels of a default (``uniform``) sample set of digits."""
    sample_set = SampleSet(count, 10, batch_size, seed)
    return torch.cat([sample_set.batch(b)["y"] for b in range(sample_set.num_batches)]).tolist()


def fid_settings(config: dict) -> dict:
    """The config's arguments of the FID callback (``fid.init_args``)."""
    return config["fid"]["init_args"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    config = yaml.safe_load(QUICKSTART.read_text())
    assert fid_settings(config)["steps"] == config["model"]["sampling_steps"] == 50
    fid_settings(config)["steps"] = SAMPLING_STEPS
    (root / "quickstart.yaml").write_text(yaml.safe_dump(config))
    run(
        root,
        "fit",
        "-c",
        "quickstart.yaml",
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.val_check_interval",
        "200",
        "--trainer.enable_progress_bar",
        "false",
        "--model.sampling_steps",
        str(SAMPLING_STEPS),
    )
    return root / "runs" / "quickstart"


@pytest.fixture(scope="module")
def classifier():
    model, accuracy = train_digits_classifier(epochs=15)
    assert accuracy > 0.95, "the judge itself must recognise real digits"
    return model


def test_quickstart_leaves_its_artifacts(quickstart):
    assert (quickstart / "checkpoints" / "last.ckpt").exists()
    assert (quickstart / "samples" / "final.png").exists()
    assert (quickstart / "config.yaml").exists() and list((quickstart / "wandb").glob("offline-run-*"))
    with open(quickstart / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 20 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])  # it learned


def test_quickstart_samples_are_the_requested_digits(quickstart, classifier):
    with np.load(quickstart / "samples" / "final.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (200, 8, 8, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [20] * 10
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    accuracy = class_accuracy(classifier, x, torch.from_numpy(labels))
    assert accuracy >= 0.8, f"only {accuracy:.0%} of the guided samples are recognised as their class"


def test_quickstart_digits_fid_falls_during_training(quickstart):
    records = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in (quickstart / "eval").glob("step_*.json")}
    assert sorted(records) == [0, 300, STEPS]
    start = records[0]["metrics"]["frechet_inception_distance"]
    end = records[STEPS]["metrics"]["frechet_inception_distance"]
    assert end < 0.25 * start, f"digits FID went from {start:.1f} to {end:.1f}"
    assert records[STEPS]["settings"]["num_samples"] == 200 and records[STEPS]["feature_extractor"] == "dico-digits"


def test_test_protocol_writes_its_record_and_samples(quickstart, tmp_path):
    """`test` runs the config's protocol (the quickstart's: 500 samples, 100 iDDPM steps; CI-sized here: 60 samples
    of 10 steps) and records exactly what it ran."""
    config = yaml.safe_load(QUICKSTART.read_text())
    fid = fid_settings(config)
    assert (fid["test_num_samples"], fid.get("test_sampler", "iddpm"), fid["test_steps"]) == (
        500,
        "iddpm",
        100,
    )
    fid.update(test_num_samples=60, test_steps=10)
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(quickstart / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    (tmp_path / "out").mkdir()
    for cache in ("digits-reference.npz", "digits-classifier.pt"):  # the run's digits FID reference and classifier
        shutil.copy(quickstart / cache, tmp_path / "out" / cache)
    run(
        tmp_path,
        "test",
        "-c",
        "quickstart.yaml",
        "--ckpt_path",
        "model.ckpt",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        "out",
    )
    record = json.loads((tmp_path / "out" / "test" / "record.json").read_text())
    settings = record["settings"]
    assert settings["num_samples"] == 60 and settings["sampler"] == "iddpm" and settings["steps"] == 10
    assert settings["cfg_scale"] == 2.0 and settings["guidance_mode"] == "all" and settings["seed"] == 0
    assert record["checkpoint"].endswith("model.ckpt") and len(record["reference_sha256"]) == 64
    assert set(record["metrics"]) >= {"frechet_inception_distance", "inception_score_mean", "precision", "recall"}
    with np.load(tmp_path / "out" / "test" / "samples.npz") as data:
        assert data["arr_0"].shape == (60, 8, 8, 1) and data["arr_1"].tolist() == uniform_labels(60, 100, 0)
    assert settings["labels"] == "uniform"  # the published protocol's random labels, by default


def test_sample_tool_is_reproducible_and_resumable(quickstart, tmp_path):
    ckpt = str(quickstart / "checkpoints" / "last.ckpt")
    args = [
        "sample",
        "--ckpt",
        ckpt,
        "--num_samples",
        "30",
        "--batch_size",
        "8",
        "--steps",
        "20",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
    ]
    run(tmp_path, *args, "--out", "a")
    with np.load(tmp_path / "a" / "samples.npz") as data:
        first, labels = data["arr_0"], data["arr_1"]
    assert first.shape == (30, 8, 8, 1) and labels.tolist() == uniform_labels(30, 8, 0)
    parts = sorted((tmp_path / "a" / "parts").glob("*/*"))  # one folder, keyed by the job
    assert [p.name for p in parts] == [f"{i:09d}.npz" for i in (0, 8, 16, 24)]
    parts[2].unlink()  # an interrupted job: only the missing batch is redone ...
    parts[2].with_name(".000000016.npz.tmp").write_bytes(b"half")  # ... and its half-written part is ignored
    (tmp_path / "a" / "samples.npz").unlink()
    run(tmp_path, *args, "--out", "a")
    with np.load(tmp_path / "a" / "samples.npz") as data:
        assert np.array_equal(data["arr_0"], first)
    with pytest.raises(ValueError, match="another job"):
        run(tmp_path, *[a if a != "20" else "30" for a in args], "--out", "a")


def test_predict_writes_an_adm_npz(quickstart, tmp_path):
    shutil.copy(quickstart / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    run(
        tmp_path,
        "predict",
        "-c",
        str(QUICKSTART),
        "--ckpt_path",
        "model.ckpt",
        "--model.sampling_steps",
        "10",
        "--data.init_args.predict_samples",
        "12",
        "--data.init_args.val_batch_size",
        "5",
        "--trainer.callbacks+=dico.callbacks.SampleWriter",
        "--trainer.callbacks.out_dir",
        "predicted",
        "--trainer.logger",
        "false",
    )
    with np.load(tmp_path / "predicted" / "samples.npz") as data:
        assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_1"].tolist() == [i % 10 for i in range(12)]
