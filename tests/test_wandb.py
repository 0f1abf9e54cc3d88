"""wandb follows the run: a resumed fit continues its wandb run, validate/test runs are grouped with it, the whole
config is in it, sample metrics and grids say they are of the EMA weights, each grid is logged once. Read back from
the offline run files (``WANDB_MODE=offline``; no network)."""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

import cli
from dico.models import create_model
from dico.profiling import count_parameters
from tests.conftest import QUICKSTART, TINY_MODEL


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB log
    blocks of 32 KiB holding records of a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def finished_records(folder: Path, timeout: float = 60.0) -> list[Any]:
    """The records of the offline run in ``folder`` once wandb's service process has written its end (``exit``):
    ``wandb.finish`` may return before the service has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(next(folder.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def read_run(folder: Path) -> dict[str, Any]:
    """An offline run folder's id, group, job type, config (nested, all updates applied) and history rows."""
    run, config, history = None, {}, []
    for record in finished_records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        if kind in ("run", "config"):
            for item in record.run.config.update if kind == "run" else record.config.update:
                keys = list(item.nested_key) or [item.key]
                node = config
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:  # an image's fields are nested under its key
                keys = list(item.nested_key) or [item.key]
                row[keys[0]] = json.loads(item.value_json) if len(keys) == 1 else "(media)"
            history.append(row)
    assert run is not None
    return {"id": run.run_id, "group": run.run_group, "job_type": run.job_type, "config": config, "history": history}


CALLBACKS = [
    "--ema.decay",
    "0.9",
    "--grid.every_n_steps",
    "2",
    "--grid.per_class",
    "1",
    "--grid.num_classes_shown",
    "2",
    "--fid.at_start",
    "false",
    "--fid.every_n_steps",
    "2",
    "--fid.num_samples",
    "20",
    "--fid.batch_size",
    "10",
    "--fid.steps",
    "2",
    "--fid.test_num_samples",
    "0",
]
TINY = [
    "-c",
    str(QUICKSTART),
    "--model.model_kwargs",
    yaml.safe_dump(TINY_MODEL, default_flow_style=True).strip(),
    "--model.sampling_steps",
    "2",
    *CALLBACKS,
    "--data.init_args.batch_size",
    "16",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()  # a run an earlier test left open
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_resumed_fit_continues_its_wandb_run_and_validate_is_grouped_with_it(in_tmp):
    assert cli.main(["fit", *TINY, "--trainer.max_steps", "2"]) == 0
    assert cli.main(["fit", *TINY, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0  # a resume
    assert cli.main(["validate", *TINY, "--ckpt_path", "last"]) == 0
    run_dir = in_tmp / "runs" / "quickstart"
    fit_id = json.loads((run_dir / "wandb-run.json").read_text())["id"]
    runs = [read_run(folder) for folder in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert [(r["id"] == fit_id, r["job_type"]) for r in runs] == [(True, "fit"), (True, "fit"), (False, "validate")]
    assert runs[0]["group"] == runs[1]["group"] == runs[2]["group"] == fit_id  # (no group configured)

    # the whole composed config, and what follows from it
    config = runs[0]["config"]
    assert config["trainer"]["max_steps"] == 2 and config["data"]["init_args"]["batch_size"] == 16
    assert config["ema"]["init_args"]["decay"] == 0.9 and config["fid"]["init_args"]["num_samples"] == 20
    assert not config.get("heldout_loss") and config["grid"]["init_args"]["num_classes_shown"] == 2
    summary = config["run"]
    assert summary["global_batch"] == 16 and summary["world_size"] == 1
    assert summary["parameters"] == count_parameters(create_model("DiCo-S", **TINY_MODEL))
    assert len(summary["commit"]) == 40 or summary["commit"] == "unknown"
    assert "torch-fidelity's unit" in summary["metric_notes"]["kid"] and "dico-digits" in summary["metric_notes"]["kid"]
    assert runs[1]["config"]["trainer"]["max_steps"] == 4

    # EMA metrics and grids named as such, each grid logged once per step (the final grid is step 4's)
    for run, steps in zip(runs[:2], ([2], [4]), strict=True):
        logged = Counter((key, row["trainer/global_step"]) for row in run["history"] for key in row if "samples" in key)
        assert logged == {(key, s): 1 for s in steps for key in ("samples_ema", "eval/samples_ema")}, logged
        fid_steps = [row["trainer/global_step"] for row in run["history"] if "eval/fid_ema" in row]
        assert fid_steps == steps and not any("eval/fid" in row for row in run["history"])
    assert os.path.exists(run_dir / "samples" / "final.png")
