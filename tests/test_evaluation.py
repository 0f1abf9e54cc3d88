"""Evaluation: torch-fidelity metrics in memory, reference statistics, the protocol's sample set, FID callback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch_fidelity
from lightning.pytorch import Trainer

import cli
from dico.callbacks import EMA, FIDEvaluation
from dico.data import DigitsDataModule, load_digits_arrays
from dico.evaluation.fidelity import (
    FeatureSpec,
    Reference,
    build_feature_extractor,
    compute_metrics,
    extract_features,
    feature_names,
    reference_from_features,
)
from dico.evaluation.images import save_npz
from dico.evaluation.protocol import EvalSettings, rank_batches, sample_batch
from dico.module import DiffusionModule
from tests.conftest import TINY_MODEL


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.fixture(scope="module")
def digits_u8() -> torch.Tensor:
    return torch.from_numpy(((load_digits_arrays()[0] + 1) * 127.5).round().astype(np.uint8))


@pytest.fixture(scope="module")
def digits_spec(tmp_path_factory) -> FeatureSpec:
    return FeatureSpec("dico-digits", str(tmp_path_factory.mktemp("clf") / "digits.pt"))


@pytest.fixture(scope="module")
def digits_extractor(digits_spec):
    return build_feature_extractor(digits_spec, ["64", "logits"])


def score(extractor, spec, generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    ref = reference_from_features(extract_features(extractor, real)["64"], spec, "test")
    return compute_metrics(extract_features(extractor, generated), ref, feature_names(extractor))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits_u8, digits_spec, digits_extractor):
    real = digits_u8[:800]
    assert abs(score(digits_extractor, digits_spec, real, real)["frechet_inception_distance"]) < 1e-6
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (10, 40, 80):
        noisy = (real.float() + sigma * torch.randn(real.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        fids.append(score(digits_extractor, digits_spec, noisy, real)["frechet_inception_distance"])
    assert 0 < fids[0] < fids[1] < fids[2]


def test_metrics_equal_torch_fidelity_calculate_metrics(digits_u8, digits_spec, digits_extractor):
    gen, real = digits_u8[1000:1600], digits_u8[:1000]
    ours = score(digits_extractor, digits_spec, gen, real)
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(gen), input2=Images(real), cuda=False, fid=True, isc=True, kid=True, prc=True,
        feature_extractor="dico-digits", feature_extractor_weights_path=digits_spec.weights_path,
        kid_subset_size=600, verbose=False, cache=False, datasets_root=None,
    )  # fmt: skip
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_inception_from_a_local_file_matches_torch_fidelity(inception_weights):
    g = torch.Generator().manual_seed(1)
    gen = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    real = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    spec = FeatureSpec("inception-v3-compat", str(inception_weights))
    extractor = build_feature_extractor(spec, ["2048", "logits_unbiased"])
    ours = score_inception(extractor, spec, gen, real)
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(gen), input2=Images(real), cuda=False, fid=True, isc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_weights), isc_splits=2,
        verbose=False, cache=False,
    )  # fmt: skip
    assert ours["frechet_inception_distance"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)


def score_inception(extractor, spec, gen, real):
    ref = reference_from_features(extract_features(extractor, real)["2048"], spec, "test")
    return compute_metrics(extract_features(extractor, gen), ref, feature_names(extractor), isc_splits=2)


def test_unsafe_or_missing_inception_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"weights_path.*weights-inception-2015-12-05"):
        build_feature_extractor(FeatureSpec("inception-v3-compat", None), ["2048"])
    with pytest.raises(FileNotFoundError, match=r"do not exist"):
        build_feature_extractor(FeatureSpec("inception-v3-compat", str(tmp_path / "nope.pth")), ["2048"])
    pickled = tmp_path / "evil.pth"
    torch.save({"not": object()}, pickled)  # needs full unpickling
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl"):
        build_feature_extractor(FeatureSpec("inception-v3-compat", str(pickled)), ["2048"])


def test_sample_set_is_the_same_on_one_and_two_processes():
    torch.manual_seed(0)
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, sampling_steps=4, clip_denoised=True)
    for p in module.model.head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    settings = EvalSettings(num_samples=10, batch_size=3, seed=5)
    one = {int(i[0]): sample_batch(module, i, settings) for i in rank_batches(settings, 0, 1)}
    two = {int(i[0]): sample_batch(module, i, settings) for r in (0, 1) for i in rank_batches(settings, r, 2)}
    assert sorted(one) == sorted(two) == [0, 3, 6, 9]
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert [len(b) for b in rank_batches(settings, 1, 2)] == [3, 1]


def test_reference_and_evaluate_commands(tmp_path, digits_u8, digits_spec, capsys):
    ref_path = tmp_path / "ref.npz"
    args = ["--feature_extractor", "dico-digits", "--weights_path", digits_spec.weights_path]
    assert cli.main(["reference", "--source", "digits", "--out", str(ref_path), *args]) == 0
    ref = Reference.load(ref_path)
    assert ref.meta["count"] == 1797 and ref.mu.shape == (64,) and ref.features.shape == (1797, 64)
    assert cli.main(["reference", "--source", "digits", "--out", str(ref_path), *args]) == 0
    assert "reusing" in capsys.readouterr().out
    samples = save_npz(tmp_path / "s.npz", digits_u8[:500].permute(0, 2, 3, 1).numpy())
    assert cli.main(["evaluate", "--samples", str(samples), "--reference", str(ref_path), *args,
                     "--out", str(tmp_path / "rec.json")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "rec.json").read_text())
    assert record["count"] == 500 and record["reference_sha256"] == ref.sha256
    assert 0 <= record["metrics"]["frechet_inception_distance"] < 50  # real digits against real digits
    with pytest.raises(FileNotFoundError, match=r"cli\.py reference"):
        Reference.load(tmp_path / "missing.npz")


def test_fid_callback_during_fit(tmp_path, digits_spec):
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3, sampling_steps=5, cfg_scale=1.0,
                             clip_denoised=True)  # fmt: skip
    fid = FIDEvaluation(
        reference=str(tmp_path / "ref.npz"), reference_source="digits", feature_extractor="dico-digits",
        weights_path=digits_spec.weights_path, at_start=True, every_n_steps=2, num_samples=40, batch_size=20,
        save_best=True,
    )  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=3, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=[EMA(decay=0.9), fid])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=256))
    records = sorted((tmp_path / "eval").glob("step_*.json"))
    assert [r.stem for r in records] == ["step_0000000", "step_0000002", "step_0000003"]
    record = json.loads(records[-1].read_text())
    assert record["settings"]["num_samples"] == 40 and record["settings"]["steps"] == 5
    assert record["feature_extractor"] == "dico-digits" and len(record["reference_sha256"]) == 64
    assert (tmp_path / "checkpoints" / "best_fid.ckpt").exists()
