"""The ablation budgets: one record each, read by every table, report, runner and search (no budget name is spelled
out anywhere else; ``tests/test_ablation_budgets.py`` holds that).

A budget is a LightningCLI overlay (``ablations/configs/budgets/<name>.yaml``: trainer, data, callback settings)
plus what only the runner needs to know about it: which row overlays it trains (full size, or a reduced size by a
scaling rule of :mod:`dico.shape_search`), which scores a row gets and how (the stages the runner runs), the
throughput timing, and the caveat its report carries. Its steps are its YAML's (``trainer.max_steps``, else
``experiments/base.yaml``'s); a test holds the scores declared here equal to what the composed callbacks do.

A new budget is one entry of :data:`BUDGETS` and one YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dico.shape_search import CROPS16_RULE, DIGITS_RULE, ProxyRule

ROOT = Path(__file__).resolve().parents[1]
BUDGET_CONFIGS = ROOT / "ablations" / "configs" / "budgets"
BASE = ROOT / "experiments" / "base.yaml"


@dataclass(frozen=True)
class Budget:
    """One budget. ``fid``: how the row's FID is made -- ``"test"``: ``cli.py test`` on ``last.ckpt`` (the test
    protocol), ``"last_step"``: the periodic FID of the last training step, None: no FID during training.
    ``heldout_loss``: the held-out denoising loss of the last step is a score. ``patch_fid``: a second score after
    training (:mod:`ablations.patch_fid`: ``cli.py sample`` options, feature extractor, reference features kept).
    ``rows``: the folder of its reduced-size row overlays under ``configs/rows/`` made by ``rule`` (None: the
    full-size rows). ``throughput``: (forward batch, interleaved turns) of the throughput ratio. ``large``: a row's
    run folder holds GBs (a loud note when it would go inside the checkout). ``seeds``: the seeds run by default."""

    name: str
    caveat: str
    fid: Literal["test", "last_step"] | None = None
    heldout_loss: bool = False
    patch_fid: dict[str, Any] | None = None
    rows: str | None = None
    rule: ProxyRule | None = None
    throughput: tuple[int, int] = (64, 20)
    large: bool = False
    seeds: tuple[int, ...] = (0,)

    @property
    def config(self) -> Path:
        return BUDGET_CONFIGS / f"{self.name}.yaml"

    @property
    def steps(self) -> int:
        """Training steps (``trainer.max_steps`` of its YAML, else of ``experiments/base.yaml``); 0: counts only."""
        for path in (self.config, BASE):
            steps = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("max_steps")
            if steps is not None:
                return int(steps)
        raise ValueError(f"neither {self.config} nor {BASE} sets trainer.max_steps")

    @property
    def trains(self) -> bool:
        return self.steps != 0

    @property
    def scores(self) -> tuple[str, ...]:
        """The scores a finished row carries, in the order they are made."""
        made = {"fid": self.fid is not None, "heldout_loss": self.heldout_loss, "patch_fid": self.patch_fid is not None}
        return tuple(score for score, made_here in made.items() if made_here)


_RECORDS = (
    Budget("structure", "No training at this budget: counts and throughput ratios only.", throughput=(64, 10)),
    Budget(
        "smoke",
        "SMOKE budget: a few steps of reduced-size models on the digits with a 20-sample FID. The numbers test the "
        "plumbing and mean nothing; no ranking or claim below should be read as evidence.",
        fid="test",
        rows="digits",
        rule=DIGITS_RULE,
        throughput=(4, 2),
    ),
    Budget(
        "proxy",
        "PROXY budget: reduced-size rows (one scaling rule, below) trained on scikit-learn's 8x8 digits and scored "
        "by the digits FID (Frechet distance on a small digits classifier's features). The values are not "
        "comparable with the paper's ImageNet FID-50K; only the rankings are compared.",
        fid="last_step",
        rows="digits",
        rule=DIGITS_RULE,
    ),
    Budget(
        "crops16",
        "CROPS16 budget: reduced-size rows (widths / 4, stage maps 16, 8, 4; windows 4x4 and 16 agents, the full "
        "size's fraction of every stage) trained on 16x16 crops of scikit-image's bundled images and scored twice: "
        "by the held-out denoising loss (noise-prediction MSE of the EMA model on 640 fixed held-out crops at fixed "
        "timesteps and noise; lower is better) and by a patch FID (the FID column: 640 EMA samples, 64 a class, "
        "iDDPM-50, sampling seed 0 for every row, against the training crops in the features of the committed crop "
        "classifier `dico-crops16`; biased upwards by the sample count, comparable only between rows). Only the "
        "rankings are compared with the paper's FID.",
        heldout_loss=True,
        rows="crops16",
        rule=CROPS16_RULE,
        throughput=(64, 10),
        patch_fid={
            # iDDPM, 50 steps, no guidance, the same seed and balanced labels for every row and seed
            "sample": {
                "num_samples": 640,
                "batch_size": 320,
                "sampler": "iddpm",
                "steps": 50,
                "cfg_scale": 1.0,
                "labels": "balanced",
                "seed": 0,
            },
            "feature_extractor": "dico-crops16",
            # FID from all training crops' mu/sigma; precision/recall and KID against a seeded subset (all 40,960
            # made their k-NN radii the evaluation's whole cost: a minute and 3 GB a row)
            "reference_features_kept": 5000,
        },
    ),
    Budget(
        "short",
        "SHORT budget: FID-10K after 50K steps, beside the paper's FID-50K after 400K steps: not the same protocol; "
        "FID-10K is biased upwards and early training ranks variants less reliably.",
        fid="test",
        large=True,
    ),
    Budget(
        "paper",
        "The paper's budget and protocol (400K steps, global batch 256, FID-50K, 250 iDDPM steps).",
        fid="test",
        large=True,
    ),
)
BUDGETS: dict[str, Budget] = {b.name: b for b in _RECORDS}
DEFAULT_BUDGET = "structure"  # run.py's --budget default: counts only, no training


def budget_of(name: str) -> Budget:
    """The record of budget ``name``; an error naming the known ones."""
    try:
        return BUDGETS[name]
    except KeyError:
        raise ValueError(f"unknown budget {name!r}; the budgets (ablations/budgets.py) are {list(BUDGETS)}") from None


def reduced_rows() -> dict[str, ProxyRule]:
    """{folder under ``configs/rows/``: the scaling rule its overlays are made by} of the reduced-size budgets."""
    return {b.rows: b.rule for b in BUDGETS.values() if b.rows and b.rule}
