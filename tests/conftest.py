"""Shared fixtures: the read-only reference material beside the checkout (``../shared``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$DICO_SHARED``, else ``shared/`` in or beside the checkout (CI lays a copy beside the clone)."""
    candidates = [os.environ.get("DICO_SHARED"), ROOT / "shared", ROOT.parent / "shared"]
    for c in candidates:
        if c and (Path(c) / "golden" / "official_reference.pt").exists():
            return Path(c)
    raise FileNotFoundError(
        "reference material not found: set DICO_SHARED to the folder holding golden/ and reference/ "
        f"(looked in {[str(c) for c in candidates if c]})"
    )


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(shared_dir() / "golden" / "official_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def paper() -> dict:
    return json.loads((shared_dir() / "reference" / "paper_tables.json").read_text())


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a network: no hub downloads, wandb offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
