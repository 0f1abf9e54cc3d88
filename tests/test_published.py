"""The published comparison: our scores beside a release's published figures only under the published protocol,
and every setting that changes the number named when it differs."""

from __future__ import annotations

import copy

import pytest

from dico.evaluation.fidelity import INCEPTION_SHA256
from dico.evaluation.published import ADM_OWN_STATISTICS, comparison
from dico.pretrained import CATALOGUE, SD_SCALE_FACTOR

SD_VAE_EMA = "stabilityai/sd-vae-ft-ema"  # the VAE the releases were trained and scored with (DiT, DiCo READMEs)


def published_protocol_record(cfg_scale: float = 1.4, size: int = 256, release: str = "DiCo-XL-3750K") -> dict:
    """A record (as ``evaluate`` and the test protocol write them) made exactly as the published figures were."""
    batch = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}[size]
    return {
        "feature_extractor": "inception-v3-compat",
        "feature_weights_file_sha256": INCEPTION_SHA256,
        "reference": {
            "source": f"/data/adm/{batch}",
            "statistics": ADM_OWN_STATISTICS,
            "image_size": [size, size],
            "count": 10_000,
        },
        "conventions": {"convention": "adm"},
        "settings": {
            "sampler": "iddpm",
            "steps": 250,
            "cfg_scale": cfg_scale,
            "guidance_mode": "official",
            "eta": 0.0,
            "num_samples": 50_000,
            "batch_size": 125,
            "seed": 0,
            "labels": "uniform",
        },
        "sample_job": {
            "pretrained": release,
            "ema": True,
            "precision": "32-true",
            "decoder": {"kind": "vae", "vae": SD_VAE_EMA, "scale_factor": 0.18215},
        },
        "metrics": {"frechet_inception_distance": 2.1, "inception_score_mean": 280.0},
    }


def test_the_published_protocol_is_compared_with_the_published_figures():
    assert SD_SCALE_FACTOR == 0.18215
    compared = comparison("DiCo-XL-3750K", published_protocol_record())
    assert compared["comparable"] and compared["differences"] == []
    assert "FID 2.10 (published 2.05), IS 280.00 (published 282.17)" in compared["line"]
    assert compared["published"]["fid"] == CATALOGUE["DiCo-XL-3750K"].fid
    assert comparison("DiT-XL-2-512", published_protocol_record(1.5, 512, "DiT-XL-2-512"))["comparable"]
    unguided = published_protocol_record(1.0, release="DiCo-S-400K")
    unguided["settings"]["guidance_mode"] = "all"  # does nothing without guidance
    assert comparison("DiCo-S-400K", unguided)["comparable"]
    assert comparison(None, unguided) is None
    hub_copy = published_protocol_record()  # the VAE given as its folder in the Hugging Face cache
    hub_copy["sample_job"]["decoder"]["vae"] = "/hf/hub/models--stabilityai--sd-vae-ft-ema/snapshots/f04b2c4b"
    assert comparison("DiCo-XL-3750K", hub_copy)["comparable"]


@pytest.mark.parametrize(
    ("where", "key", "value", "named"),
    [
        (None, "feature_extractor", "dico-digits", "feature extractor dico-digits"),
        ("reference", "source", "/data/my_val_256.npz", "reference /data/my_val_256.npz"),
        ("reference", "statistics", "computed from the 10000 images", "computed from the 10000 images"),
        ("conventions", "convention", "torch-fidelity", "metric convention torch-fidelity"),
        ("settings", "labels", "balanced", "labels balanced (published: uniform)"),
        ("settings", "guidance_mode", "all", "guidance_mode all (published: official)"),
        ("settings", "cfg_scale", 1.5, "cfg_scale 1.5 (published: 1.4)"),
        ("settings", "sampler", "ddim", "sampler ddim (published: iddpm)"),
        ("settings", "steps", 50, "steps 50 (published: 250)"),
        ("settings", "num_samples", 10_000, "num_samples 10000 (published: 50000)"),
        # random (or any other) Inception weights under the published name
        (
            None,
            "feature_weights_file_sha256",
            "0" * 64,
            f"Inception weights file sha256 {'0' * 64} (published: "
            f"weights-inception-2015-12-05-6726825d.pth, sha256 {INCEPTION_SHA256})",
        ),
        # a 20-image batch under the published name
        ("reference", "count", 20, "reference of 20 images (published: VIRTUAL_imagenet256_labeled.npz's 10000)"),
        # the 512 batch named as the 256 one
        ("reference", "image_size", [512, 512], "reference resolution [512, 512] (published: 256x256)"),
        (
            "sample_job",
            "decoder",
            {"kind": "vae", "vae": "stabilityai/sd-vae-ft-mse", "scale_factor": 0.18215},
            "VAE stabilityai/sd-vae-ft-mse x 0.18215 (published: stabilityai/sd-vae-ft-ema x 0.18215)",
        ),
        ("sample_job", "precision", "bf16-mixed", "precision bf16-mixed (published: 32-true)"),
        ("sample_job", "ema", False, "EMA weights False (published: the release's EMA weights)"),
        # samples of another release, or of a dico checkpoint (e.g. fine-tuned from the release: no release)
        (
            "sample_job",
            "pretrained",
            "DiCo-XL-400K",
            "samples of DiCo-XL-400K (compared with: the release DiCo-XL-3750K)",
        ),
        ("sample_job", "pretrained", None, "samples of None (compared with: the release DiCo-XL-3750K)"),
    ],
)
def test_every_setting_that_changes_the_number_makes_it_not_comparable(where, key, value, named):
    record = copy.deepcopy(published_protocol_record())
    (record[where] if where else record)[key] = value
    compared = comparison(CATALOGUE["DiCo-XL-3750K"], record)
    assert not compared["comparable"] and len(compared["differences"]) == 1 and named in compared["differences"][0]
    assert "not comparable with the published figures: " + compared["differences"][0] in compared["line"]
    assert "published 2.05" not in compared["line"]  # the published figure is not printed beside ours as a match


def test_unknown_settings_and_another_resolution_are_not_comparable():
    record = published_protocol_record()
    record["settings"] = None  # samples without their samples.json
    assert "sample settings unknown" in comparison("DiCo-XL-3750K", record)["line"]
    record = published_protocol_record()
    record["sample_job"] = None
    assert comparison("DiCo-XL-3750K", record)["differences"] == [
        "what sampled them unknown (no record of the sample job: release, weights, precision, VAE)"
    ]
    assert "published: VIRTUAL_imagenet512.npz" in comparison("DiT-XL-2-512", published_protocol_record(1.5))["line"]
