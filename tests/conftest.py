"""Shared fixtures: the reference material (``tests/reference/``), tiny models and data, an offline network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before torch loads (OpenMP reads these once): idle OpenMP threads sleep instead of spinning, as dico's CLI
# arranges, and a pytest-xdist worker uses its share of the CPUs. The CLI run in-process and every subprocess a test
# starts inherit both; spinning threads beside another worker made in-process training steps 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    from dico.runtime import usable_cpus  # (imports no torch)

    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import torch

ROOT = Path(__file__).resolve().parents[1]


# Test files by their time (``--durations``), longest first: the order pytest-xdist hands them to its workers (each
# file to one worker; pyproject's --no-loadscope-reorder), so that the short ones fill in at the end and the workers
# finish together. Files not listed come last.
LONGEST_FIRST = (
    "test_ablation_runner.py",
    "test_quickstart.py",
    "test_notebooks.py",
    "test_models.py",
    "test_benchmarks.py",
    "test_training.py",
    "test_ablation_slurm.py",
    "test_pretrained.py",
    "test_training_gpu.py",
    "test_ablation_models.py",
    "test_evaluation.py",
    "test_cli.py",
    "test_run_folder.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


#: The goldens of the published code; what made them, and every file's sha256: ``tests/reference/README.md``.
GOLDEN = ROOT / "tests" / "reference" / "official_reference.pt"


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="session")
def paper() -> dict:
    """The paper's figures, from their one home: the package's ``dico/reference/paper_tables.json``."""
    from dico.models.ablation import paper_tables

    return paper_tables()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a network: no hub downloads, wandb offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


TINY_MODEL = {"hidden_size": 8, "depth": [1, 1, 1, 1, 1], "in_channels": 1, "input_size": 8, "num_classes": 10}
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised small AutoencoderKL saved with ``save_pretrained`` (downsamples by 2)."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of small random RGB images of assorted sizes, plus one corrupt file."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ant", "bee"]):
        (root / name).mkdir()
        for i in range(6):
            h, w = 20 + 4 * i, 30 - 2 * i
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / f"{c}_{i}.png")
    (root / "bee" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Randomly initialised Inception weights saved as a plain state dict (the real file cannot be fetched here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    real_load = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = original
        fe.load_state_dict_from_url = real_load
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def cpu_trainer(root: Path, max_steps: int, callbacks: list, **kwargs):  # type: ignore[no-untyped-def]
    """A quiet one-process CPU ``Trainer`` of the tests: no logger, bar, summary or validation; ``kwargs`` add to
    (or override) these."""
    from lightning.pytorch import Trainer

    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    settings = {**quiet, "limit_val_batches": 0, **kwargs}
    return Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, callbacks=callbacks, **settings)
