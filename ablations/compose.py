"""A row's composed config and what is derived from it before launch: placement on nodes x devices, and the FID
reference made once for all rows.

A row's config is composed in this process by ``cli.py``'s own parser (:func:`cli.compose_lightning_config`): the
same dict ``python cli.py fit <row's configs> --print_config`` prints, from any working directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from ablations.rows import ROOT, Row


def resolve(row: Row, out: Path, extra: list[str]) -> dict[str, Any]:
    """The row's composed config as ``python cli.py fit ... --print_config`` prints it (interpolations resolved),
    less that subcommand's own ``ckpt_path``/``weights_only``."""
    import cli

    try:
        return cli.compose_lightning_config(row.cli_args(out, extra, absolute=True))
    except SystemExit as e:  # the parser said why above
        command = "python cli.py fit " + " ".join(row.cli_args(out, extra))
        raise SystemExit(f"could not compose the config of {row.model} ({row.key}): `{command}` fails as above") from e


def placement(config: dict[str, Any], nodes: int | None, devices: int | None) -> list[str]:
    """Options moving the row onto ``nodes`` x ``devices`` with its global batch unchanged; an error if it does not
    divide (the global batch is part of the recipe, never floored)."""
    if nodes is None and devices is None:
        return []
    t, per_device = config["trainer"], config["data"]["init_args"]["batch_size"]
    accumulate = t.get("accumulate_grad_batches") or 1
    global_batch = t["num_nodes"] * t["devices"] * per_device * accumulate
    nodes, devices = nodes or t["num_nodes"], devices or t["devices"]
    share, rest = divmod(global_batch, nodes * devices * accumulate)
    if rest or share == 0:
        raise SystemExit(
            f"the global batch {global_batch} does not divide over {nodes} node(s) x {devices} device(s) x "
            f"{accumulate} accumulation step(s); choose a device count that divides it, or set "
            f"--trainer.accumulate_grad_batches so that nodes x devices x per-device batch x accumulation = "
            f"{global_batch}"
        )
    return [
        "--trainer.num_nodes",
        str(nodes),
        "--trainer.devices",
        str(devices),
        "--data.init_args.batch_size",
        str(share),
    ]


def fid_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The FID callback's arguments in a composed config (``fid.init_args``; empty when it is off: ``fid: null``)."""
    return (config.get("fid") or {}).get("init_args") or {}


def prepare_reference(config: dict[str, Any]) -> None:
    """Compute the FID reference statistics (and, for the digits FID, place its committed classifier) once, before
    rows that would each compute them at the same time are launched: ``python cli.py reference`` with the config's
    settings."""
    fid = fid_settings(config)
    if not fid.get("reference_source") or (ROOT / fid["reference"]).exists():
        return
    command = [sys.executable, str(ROOT / "cli.py"), "reference", "--source", fid["reference_source"],
               "--out", fid["reference"], "--feature_extractor", fid["feature_extractor"],
               "--device", "cpu"]  # fmt: skip  # argv: flag/value pairs
    if fid.get("weights_path"):
        command += ["--weights_path", fid["weights_path"]]
    if fid.get("reference_image_size"):
        command += ["--image_size", str(fid["reference_image_size"])]
    print(f"[ablations] FID reference: python {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
