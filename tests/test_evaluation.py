"""Evaluation: features and metrics against independent NumPy versions of ADM's formulas, ADM-format reference
batches, reference checks, torch-fidelity parity, and the non-degenerate Inception path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from scipy import linalg

import cli
from dico.data import load_digits_arrays
from dico.evaluation import FeatureSpec, Featurizer, MetricOptions, Reference, compute_metrics, compute_reference
from dico.evaluation.fidelity import gaussian_statistics, inception_score_adm, precision_recall_adm
from dico.evaluation.images import save_npz
from dico.evaluation.protocol import score_npz
from dico.evaluation.reference import subsample


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.fixture(scope="module")
def digits_u8() -> torch.Tensor:
    """All 1797 digits, uint8 (N, 1, 8, 8)."""
    return torch.from_numpy(((load_digits_arrays()[0] + 1) * 127.5).round().astype(np.uint8))


@pytest.fixture(scope="module")
def digits_spec(tmp_path_factory) -> FeatureSpec:
    return FeatureSpec("dico-digits", str(tmp_path_factory.mktemp("clf") / "digits.pt"))


@pytest.fixture(scope="module")
def featurizer(digits_spec) -> Featurizer:
    return Featurizer(digits_spec)


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------ independent NumPy versions of ADM
def adm_fid(mu1, sigma1, mu2, sigma2) -> float:
    """ADM's ``FIDStatistics.frechet_distance`` (scipy's sqrtm)."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def adm_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = np.mean(np.sum(part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True))), 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def adm_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    def dist(u, v):  # float16 inputs, float32 accumulation, float16 result (a GPU's half matmul)
        u16, v16 = u.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
        nu, nv = (u16**2).sum(1).astype(np.float16), (v16**2).sum(1).astype(np.float16)
        d = np.maximum(nu[:, None] - np.float16(2) * (u16 @ v16.T).astype(np.float16) + nv[None], np.float16(0))
        if not np.isfinite(d).all():
            d = np.maximum((u**2).sum(1)[:, None] - 2 * u @ v.T + (v**2).sum(1)[None], 0)
        return d.astype(np.float32)

    r_ref = np.partition(dist(ref, ref), k, axis=1)[:, k]
    r_sample = np.partition(dist(sample, sample), k, axis=1)[:, k]
    d = dist(ref, sample)  # (ref, sample)
    precision = (d <= r_ref[:, None]).any(0).mean()
    recall = (d <= r_sample[None]).any(1).mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------------- tests
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits_u8, featurizer):
    real = digits_u8[:800]
    ref, cheap = compute_reference_from(featurizer, real), MetricOptions(kid_subset_size=50)
    assert abs(compute_metrics(featurizer.run([real]), ref, cheap)["frechet_inception_distance"]) < 1e-6
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (10, 40, 80):
        noisy = (real.float() + sigma * torch.randn(real.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        fids.append(compute_metrics(featurizer.run([noisy]), ref, cheap)["frechet_inception_distance"])
    assert 0 < fids[0] < fids[1] < fids[2]


def compute_reference_from(featurizer: Featurizer, images: torch.Tensor, batch_size: int = 100) -> Reference:
    """A reference of ``images`` through the ``.npz`` path (no ADM statistics inside: computed from the images)."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "images.npz"
    save_npz(path, nhwc(images))
    return compute_reference(str(path), featurizer, batch_size=batch_size)


def test_metrics_equal_torch_fidelity_calculate_metrics(digits_u8, digits_spec, featurizer):
    gen, real = digits_u8[1000:1600], digits_u8[:1000]
    # batches of 64 as torch-fidelity's, so that the float32 features are the same to the bit
    ours = compute_metrics(
        featurizer.run(gen.split(64)),
        compute_reference_from(featurizer, real, 64),
        MetricOptions("torch-fidelity", kid_subset_size=600),
    )
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(gen),
        input2=Images(real),
        cuda=False,
        fid=True,
        isc=True,
        kid=True,
        prc=True,
        feature_extractor="dico-digits",
        feature_extractor_weights_path=digits_spec.weights_path,
        kid_subset_size=600,
        verbose=False,
        cache=False,
        datasets_root=None,
    )
    for key, value in theirs.items():  # torch-fidelity subtracts the means in float32, ADM in float64
        assert ours[key] == pytest.approx(value, rel=1e-6 if "frechet" in key else 1e-12, abs=1e-12), key


def test_adm_reference_batch_gives_the_adm_fid_and_sfid(tmp_path, digits_u8, featurizer):
    """An ADM-format reference batch: mu/sigma (mu_s/sigma_s) over the full set, float64, and a 150-image arr_0.
    FID/sFID must use the batch's statistics (not arr_0's), equal ADM's formulas on the same features, and
    precision/recall must use arr_0's features."""
    clf = featurizer.extractor.classifier
    x = digits_u8.float() / 127.5 - 1
    with torch.no_grad():
        pool_all = clf.features(x).double().numpy()
        spatial_all = clf.body[:5](x)[:, :7].permute(0, 2, 3, 1).flatten(1).double().numpy()  # NHWC, as ADM
    mu, sigma = adm_stats(pool_all)
    mu_s, sigma_s = adm_stats(spatial_all)
    batch = tmp_path / "VIRTUAL_digits_labeled.npz"
    np.savez(batch, arr_0=nhwc(digits_u8[:150]), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    assert mu.dtype == np.float64
    ref = compute_reference(str(batch), featurizer)
    assert ref.meta["count"] == 150 and ref.features.shape == (150, 64) and ref.meta["image_size"] == [8, 8]

    samples = digits_u8[1000:1400]
    with torch.no_grad():
        xs = samples.float() / 127.5 - 1
        pool, spatial = clf.features(xs).numpy(), clf.body[:5](xs)[:, :7].permute(0, 2, 3, 1).flatten(1).numpy()
    out = compute_metrics(featurizer.run([samples]), ref)
    expected_fid = adm_fid(*adm_stats(pool), mu, sigma)  # float32 features, as ADM's TF graph gives them
    expected_sfid = adm_fid(*adm_stats(spatial), mu_s, sigma_s)
    assert out["frechet_inception_distance"] == pytest.approx(expected_fid, rel=1e-6)
    assert out["spatial_frechet_inception_distance"] == pytest.approx(expected_sfid, rel=1e-6)
    arr0_fid = adm_fid(*adm_stats(pool), *adm_stats(pool_all[:150]))
    assert abs(arr0_fid - expected_fid) > 0.1 * expected_fid  # the arr_0 statistics would give another number
    precision, recall = adm_precision_recall(ref.features, pool)
    assert out["precision"] == pytest.approx(precision, abs=1e-12)
    assert out["recall"] == pytest.approx(recall, abs=1e-12)


def test_adm_inception_score_and_precision_recall_equal_numpy():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(23, 10, generator=g)
    assert inception_score_adm(logits, 7)["inception_score_mean"] == pytest.approx(
        adm_inception_score(logits.double().numpy(), 7), rel=1e-12
    )  # splits of 7, 7, 7, 2 in sample order
    real, fake = torch.randn(60, 16, generator=g), 1.3 * torch.randn(45, 16, generator=g) + 0.3
    ours = precision_recall_adm(real, fake, block=16)  # several row and column blocks
    precision, recall = adm_precision_recall(real.numpy(), fake.numpy())
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision, recall), abs=1e-12)
    assert 0 < precision < 1 and 0 < recall < 1


def test_reference_subset_is_random_seeded_and_keeps_every_class():
    labels = torch.arange(10).repeat_interleave(100)  # a folder listed class by class
    features = torch.nn.functional.one_hot(labels).float()
    kept, index = subsample(features, 100, seed=0)
    assert len(set(labels[index].tolist())) == 10 and len(kept) == 100
    assert np.array_equal(subsample(features, 100, seed=0)[1], index)
    assert not np.array_equal(subsample(features, 100, seed=1)[1], index)
    assert np.array_equal(subsample(features, 5000, seed=0)[1], np.arange(1000))


def test_bad_references_are_refused_before_any_sample_is_featurised(tmp_path, digits_u8, featurizer, monkeypatch):
    ref = compute_reference_from(featurizer, digits_u8[:300])
    ref.save(tmp_path / "ref.npz")
    big = save_npz(tmp_path / "big.npz", np.zeros((4, 16, 16, 1), np.uint8))

    def no_features(*args, **kwargs):
        raise AssertionError("featurised before the checks")

    monkeypatch.setattr(Featurizer, "__call__", no_features)
    with pytest.raises(ValueError, match=r"samples are 16x16, the reference .* is 8x8.*VIRTUAL_imagenet16"):
        score_npz(big, Reference.load(tmp_path / "ref.npz"), featurizer)
    state = featurizer.extractor.classifier.state_dict()
    torch.save({**state, "head.weight": 2 * state["head.weight"]}, tmp_path / "other.pt")
    other = Featurizer(FeatureSpec("dico-digits", str(tmp_path / "other.pt")))  # same name, other weights
    with pytest.raises(ValueError, match=r"weights_sha256.*cli\.py reference --overwrite"):
        score_npz(big, Reference.load(tmp_path / "ref.npz"), other)
    adm_batch = tmp_path / "VIRTUAL_x.npz"
    np.savez(adm_batch, arr_0=np.zeros((2, 8, 8, 1), np.uint8), mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"ADM reference batch.*cli\.py reference --source"):
        Reference.load(adm_batch)
    with pytest.raises(FileNotFoundError, match=r"cli\.py reference"):
        Reference.load(tmp_path / "missing.npz")
    good = (tmp_path / "ref.npz").read_bytes()
    for name, content in {"truncated.npz": good[: len(good) // 2], "garbage.npz": bytes(range(256)) * 4}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a dico reference-statistics file.*cli\.py reference"):
            Reference.load(tmp_path / name)
    # sample files that are no ADM batch: named as such before any featurising
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 1, 8, 8), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "nchw.npz").read_bytes()[:50])
    for name, why in (("keys.npz", r"holds \['images'\], no arr_0"), ("nchw.npz", "channels go last"), ("cut.npz", "")):
        with pytest.raises(ValueError, match=rf"{name} is not an ADM-format sample file.*{why}"):
            score_npz(tmp_path / name, Reference.load(tmp_path / "ref.npz"), featurizer)
    with pytest.raises(ValueError, match="metric convention"):
        MetricOptions("tf")


def test_reference_and_evaluate_commands(tmp_path, digits_u8, digits_spec, capsys):
    """``evaluate`` takes the feature extractor the reference was made with (here the digits classifier, as the
    quickstart's own reference): no --feature_extractor needed, and no Inception to download."""
    ref_path = tmp_path / "ref.npz"
    args = ["--feature_extractor", "dico-digits", "--weights_path", digits_spec.weights_path]
    assert cli.main(["reference", "--source", "digits", "--out", str(ref_path), "--max_features", "500", *args]) == 0
    ref = Reference.load(ref_path)
    assert ref.meta["count"] == 1797 and ref.mu.shape == (64,) and ref.features.shape == (500, 64)
    assert ref.mu_s.shape == (112,) and ref.sigma_s.shape == (112, 112)
    assert cli.main(["reference", "--source", "digits", "--out", str(ref_path), *args]) == 0
    assert "reusing" in capsys.readouterr().out
    samples = save_npz(tmp_path / "s.npz", nhwc(digits_u8[:500]))
    rec = tmp_path / "rec.json"
    assert cli.main(["evaluate", "--samples", str(samples), "--reference", str(ref_path), "--out", str(rec)]) == 0
    record = json.loads((tmp_path / "rec.json").read_text())
    assert record["count"] == 500 and record["reference_sha256"] == ref.sha256
    assert record["conventions"]["convention"] == "adm" and record["conventions"]["prc_neighborhood"] == 3
    assert 0 <= record["metrics"]["frechet_inception_distance"] < 50  # real digits against real digits
    assert 0 <= record["metrics"]["spatial_frechet_inception_distance"] < 50


# ---------------------------------------------------------------------------------------------- Inception path
@pytest.fixture(scope="module")
def calibrated_inception(inception_weights, tmp_path_factory):
    """Random Inception weights made non-degenerate: every batch norm's statistics are set from a batch of
    images (so each layer's output has unit scale, as with trained weights) and the classifier is scaled so
    that its predictions are confident. The real file cannot be fetched here."""
    net = Featurizer(FeatureSpec("inception-v3-compat", str(inception_weights))).extractor
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of the calibration batch
    g = torch.Generator().manual_seed(0)
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8))
        net.fc.weight.mul_(30)
    path = tmp_path_factory.mktemp("calibrated") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_sfid_hook_and_metrics(calibrated_inception):
    g = torch.Generator().manual_seed(1)
    gen = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    real = torch.randint(0, 256, (3, 1, 32, 32), generator=g, dtype=torch.uint8) // 2  # grey: expanded to RGB
    featurizer = Featurizer(FeatureSpec("inception-v3-compat", str(calibrated_inception)))
    branch = []  # TF's mixed_6/conv = the 1x1 branch of Mixed_6d: the first 192 channels of its output
    featurizer.extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: branch.append(out))
    feats = featurizer(gen)
    assert feats["pool"].shape == (3, 2048) and feats["spatial"].shape == (3, 17 * 17 * 7)  # ADM's 2023 dims
    torch.testing.assert_close(feats["spatial"], branch[0][:, :7].permute(0, 2, 3, 1).flatten(1))
    assert 0.1 < feats["pool"].std().item() < 10 and feats["spatial"].std().item() > 0.1  # unit scale
    plain = featurizer.extractor(gen)  # torch-fidelity's own forward: the features we score are its features
    torch.testing.assert_close(feats["pool"], plain[0])
    torch.testing.assert_close(feats["logits"], plain[1])
    is_mean = inception_score_adm(feats["logits"])["inception_score_mean"]
    assert is_mean > 1.5  # confident and varied predictions (at most 3 for 3 images): a test that can fail
    ref_feats = featurizer(real)
    mu, sigma = gaussian_statistics(ref_feats["pool"])
    mu_s, sigma_s = gaussian_statistics(ref_feats["spatial"])
    ref = Reference(mu, sigma, mu_s, sigma_s, ref_feats["pool"].numpy(), {})
    out = compute_metrics(feats, ref, MetricOptions(kid_subset_size=3))
    assert out["frechet_inception_distance"] > 1 and out["spatial_frechet_inception_distance"] > 1
    assert out["inception_score_mean"] == pytest.approx(is_mean)


def test_unsafe_or_missing_inception_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"weights_path.*weights-inception-2015-12-05"):
        Featurizer(FeatureSpec("inception-v3-compat", None))
    with pytest.raises(FileNotFoundError, match=r"do not exist"):
        Featurizer(FeatureSpec("inception-v3-compat", str(tmp_path / "nope.pth")))
    pickled = tmp_path / "evil.pth"
    torch.save({"not": object()}, pickled)  # needs full unpickling
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl"):
        Featurizer(FeatureSpec("inception-v3-compat", str(pickled)))


def test_inception_weights_come_from_the_torch_hub_cache_loaded_weights_only(inception_weights, tmp_path, monkeypatch):
    """Without weights_path: the file in ``$TORCH_HOME/hub/checkpoints`` (offline too), else downloaded there once
    (online), and loaded weights-only -- torch-fidelity's own download would unpickle it fully."""
    import shutil

    from dico.evaluation.fidelity import INCEPTION, INCEPTION_FILE, build_feature_extractor

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    with pytest.raises(FileNotFoundError, match=rf"no Inception weights.*{INCEPTION_FILE}.*offline"):
        build_feature_extractor(FeatureSpec(INCEPTION, None), ["2048"])
    downloads = []

    def download(url, dest):  # what the online path fetches, into the cache
        downloads.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(inception_weights, dest)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online = build_feature_extractor(FeatureSpec(INCEPTION, None), ["2048"])
    assert len(downloads) == 1 and downloads[0].endswith(INCEPTION_FILE) and cached.is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline now: the cached file serves, nothing downloads
    offline = build_feature_extractor(FeatureSpec(INCEPTION, None), ["2048"])
    assert len(downloads) == 1
    want = torch.load(inception_weights, weights_only=True)
    for extractor in (online, offline):
        got = extractor.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    torch.save({"weights": torch.ones(1), "trap": Path("/")}, cached)  # a pickled object: refused, not run
    with pytest.raises(Exception, match=r"Unsupported global|[Ww]eights only load failed"):
        build_feature_extractor(FeatureSpec(INCEPTION, None), ["2048"])


# ------------------------------------------------------------------------------- the digits FID's classifier
def test_the_digits_fid_uses_the_committed_classifier_on_every_machine(tmp_path):
    """The FID's classifier is the committed file (its sha256 checked), copied where a config asks for it; a
    different file there is used with a warning (its FIDs are not comparable)."""
    import hashlib
    import warnings

    from dico.evaluation import digits

    assert hashlib.sha256(digits.COMMITTED.read_bytes()).hexdigest() == digits.COMMITTED_SHA256
    committed = torch.load(digits.COMMITTED, map_location="cpu", weights_only=True)
    path = tmp_path / "sub" / "classifier.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = digits.load_or_train_classifier(path)  # a missing file: a copy of the committed one, not trained
    assert digits.file_sha256(path) == digits.COMMITTED_SHA256
    assert all(torch.equal(v, committed[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, committed[k]) for k, v in digits.load_or_train_classifier(None).state_dict().items())
    other = digits.DigitsClassifier().state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.warns(UserWarning, match="not the committed dico-digits classifier"):
        model = digits.load_or_train_classifier(tmp_path / "other.pt")
    assert torch.equal(model.state_dict()["head.bias"], other["head.bias"])


def test_training_the_digits_classifier_does_not_depend_on_the_thread_count():
    from dico.evaluation.digits import train_digits_classifier

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = train_digits_classifier(epochs=2)[0].state_dict()
        torch.set_num_threads(2)
        two = train_digits_classifier(epochs=2)[0].state_dict()
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(v, two[k]) for k, v in one.items())


@pytest.mark.slow
def test_the_committed_classifier_is_what_training_gives_on_the_default_kernels():
    """How the committed file was made: train_digits_classifier() (on the development machine with
    ATEN_CPU_CAPABILITY=default, bit for bit). BLAS picks its kernels by CPU whatever that variable says, so on another
    machine the retrained weights may differ in the last bits and training amplifies that: what must hold anywhere is
    the same classifier, i.e. the same decision on (nearly) every digit and the same accuracy."""
    from dico.data.datamodule import load_digits_arrays
    from dico.evaluation import digits

    committed = digits.DigitsClassifier()
    committed.load_state_dict(torch.load(digits.COMMITTED, map_location="cpu", weights_only=True))
    retrained, _ = digits.train_digits_classifier()
    images, labels = (torch.from_numpy(a) for a in load_digits_arrays())
    with torch.no_grad():
        ours, theirs = retrained(images).argmax(1), committed.eval()(images).argmax(1)
    assert (ours == theirs).float().mean().item() >= 0.98
    accuracy = digits.class_accuracy(committed, images, labels)
    assert accuracy >= 0.95 and abs(digits.class_accuracy(retrained, images, labels) - accuracy) < 0.02


def test_the_crops16_patch_fid_classifier_is_committed_and_sees_structure(tmp_path):
    """The crops16 budget's patch FID features (``dico-crops16``): the committed file, a classifier of the source
    image of held-out crops it never saw (85.5% where it was made; chance is 10%), and features that tell a real
    crop from the same crop with its pixels shuffled (same histogram, no spatial structure)."""
    from dico.data.image_crops import image_crops
    from dico.evaluation.small_classifier import COMMITTED, class_accuracy, file_sha256, load_committed

    spec = COMMITTED["dico-crops16"]
    assert file_sha256(spec.file) == spec.sha256
    classifier = load_committed("dico-crops16")
    crops = image_crops(crop_size=16, train_per_image=400)
    held_x, held_y = torch.from_numpy(crops.heldout_x), torch.from_numpy(crops.heldout_y)
    assert class_accuracy(classifier, held_x, held_y) >= 0.84

    def u8(x: np.ndarray) -> np.ndarray:
        return ((x + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)

    save_npz(tmp_path / "train.npz", u8(crops.train_x))
    featurizer = Featurizer(FeatureSpec("dico-crops16"))
    reference = compute_reference(str(tmp_path / "train.npz"), featurizer)
    assert reference.meta["image_size"] == [16, 16] and reference.mu.shape == (64,) and reference.mu_s.shape == (448,)
    held = u8(crops.heldout_x)
    flat = held.reshape(len(held), -1)
    shuffled = np.stack([row[np.random.default_rng(i).permutation(flat.shape[1])] for i, row in enumerate(flat)])
    real_fid = compute_metrics(featurizer(held), reference)["frechet_inception_distance"]
    shuffled_fid = compute_metrics(featurizer(shuffled.reshape(held.shape)), reference)["frechet_inception_distance"]
    assert shuffled_fid > 3 * real_fid
    with pytest.raises(ValueError, match=r"dico-crops16 takes uint8 \(B, 1, 16, 16\)"):
        featurizer(u8(crops.heldout_x[:, :, :8, :8]))


def test_a_reference_made_from_another_source_or_extractor_is_refused(
    tmp_path, digits_u8, digits_spec, featurizer, capsys
):
    """`reference --out` holding statistics of another source or extractor is not reused: the fix is named."""
    ref = tmp_path / "ref.npz"
    digits = ["--feature_extractor", "dico-digits", "--weights_path", digits_spec.weights_path]
    assert cli.main(["reference", "--source", "digits", "--out", str(ref), "--max_features", "100", *digits]) == 0
    made = ref.read_bytes()
    batch = save_npz(tmp_path / "batch.npz", nhwc(digits_u8[:50]))
    with pytest.raises(
        ValueError, match=r"made with source digits \(asked: .*batch\.npz\).*--overwrite.*another --out"
    ):
        cli.main(["reference", "--source", str(batch), "--out", str(ref), *digits])
    state = featurizer.extractor.classifier.state_dict()
    torch.save({**state, "head.weight": 2 * state["head.weight"]}, tmp_path / "other.pt")
    other = ["--feature_extractor", "dico-digits", "--weights_path", str(tmp_path / "other.pt")]
    with pytest.raises(ValueError, match=r"weights_sha256 .* \(asked: .*--overwrite"):
        cli.main(["reference", "--source", "digits", "--out", str(ref), *other])
    assert ref.read_bytes() == made
    assert cli.main(["reference", "--source", "digits", "--out", str(ref), *digits]) == 0
    assert "reusing it" in capsys.readouterr().out
    assert cli.main(["reference", "--source", str(batch), "--out", str(ref), "--overwrite", *digits]) == 0
    assert Reference.load(ref).meta["source"] == str(batch) and Reference.load(ref).meta["count"] == 50
    folder = Reference.load(ref)
    folder.meta.update(source=str(tmp_path), image_size=[16, 16])  # as made from an image folder at 16x16
    assert folder.differences(str(tmp_path), None, 16) == []
    assert folder.differences(str(tmp_path), None, 32) == ["image size [16, 16] (asked: 32)"]


def test_an_adm_batch_without_spatial_statistics_scores_fid_from_its_mu_sigma(tmp_path, digits_u8, featurizer):
    """A reference batch with mu/sigma and no mu_s/sigma_s: FID against its mu/sigma (not its images'), no sFID,
    and the reference says why."""
    stats = adm_stats(featurizer(digits_u8[1000:]).get("pool").numpy())  # statistics of other digits than arr_0
    batch = tmp_path / "VIRTUAL_digits.npz"
    np.savez(batch, arr_0=nhwc(digits_u8[:300]), mu=stats[0], sigma=stats[1])
    ref = compute_reference(str(batch), featurizer)
    assert np.array_equal(ref.mu, stats[0]) and "sFID needs mu_s/sigma_s" in ref.meta["statistics"]
    samples = save_npz(tmp_path / "s.npz", nhwc(digits_u8[300:600]))
    ref.save(tmp_path / "ref.npz")
    metrics = score_npz(samples, Reference.load(tmp_path / "ref.npz"), featurizer)["metrics"]
    want = adm_fid(*adm_stats(featurizer(digits_u8[300:600])["pool"].numpy()), *stats)
    assert metrics["frechet_inception_distance"] == pytest.approx(want, rel=1e-6)
    assert "spatial_frechet_inception_distance" not in metrics


def test_small_sets_state_the_k_and_subset_sizes_used_and_one_sample_is_refused(
    tmp_path, digits_u8, featurizer, monkeypatch
):
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    ref = compute_reference_from(featurizer, digits_u8[:300])
    two = save_npz(tmp_path / "two.npz", nhwc(digits_u8[300:302]))
    record = score_npz(two, ref, featurizer, MetricOptions("torch-fidelity"))
    used = record["conventions"]["used"]
    assert record["conventions"]["prc_neighborhood"] == 3 and record["conventions"]["kid_subset_size"] == 1000
    assert (used["prc_neighborhood"], used["kid_subset_size"], used["inception_score_splits"]) == (1, 2, 2)
    pool, ref_pool = featurizer(digits_u8[300:302])["pool"], torch.from_numpy(ref.features)
    kid = kid_features_to_metric(pool, ref_pool, kid_subset_size=2, verbose=False)["kernel_inception_distance_mean"]
    prc = prc_features_to_metric(pool, ref_pool, prc_neighborhood=1, verbose=False)
    assert record["metrics"]["kernel_inception_distance_mean"] == pytest.approx(float(kid), rel=1e-9)
    assert record["metrics"]["precision"] == pytest.approx(float(prc["precision"]), abs=1e-12)
    assert score_npz(save_npz(tmp_path / "many.npz", nhwc(digits_u8[300:800])), ref, featurizer)["conventions"][
        "used"
    ] == {
        "num_samples": 500,
        "num_reference_features": 300,
        "prc_neighborhood": 3,
        "kid_subset_size": 300,
        "inception_score_splits": 1,
    }
    one = save_npz(tmp_path / "one.npz", nhwc(digits_u8[:1]))
    monkeypatch.setattr(Featurizer, "__call__", lambda *a, **k: pytest.fail("featurised before the check"))
    with pytest.raises(ValueError, match=r"at least 2 samples .* got 1 samples: score more samples"):
        score_npz(one, ref, featurizer)
