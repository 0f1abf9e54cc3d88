"""Latent extraction, the sharded cache, the sampler and the datamodules."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from dico.data import DigitsDataModule, EpochSampler, ExtractConfig, LatentDataModule, ShardedLatents, extract_latents
from dico.data.extract import center_crop_arr
from dico.data.latents import InMemoryLatents
from dico.data.vae import encode_moments, load_vae


def config(image_folder, out, vae, **kw) -> ExtractConfig:
    args = dict(image_size=16, batch_size=4, shard_size=4, num_workers=0, progress=False)
    return ExtractConfig(str(image_folder), str(out), vae=str(vae), **{**args, **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory, image_folder, tiny_vae_dir):
    out = tmp_path_factory.mktemp("latents")
    manifest = extract_latents(config(image_folder, out, tiny_vae_dir))
    return out, manifest


def test_center_crop_matches_adm_geometry():
    img = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint8).reshape(100, 60, 3) % 251)
    out = center_crop_arr(img, 16)
    assert out.size == (16, 16)
    # box-halved twice (100x60 -> 50x30 -> 25x15 stops: 15 < 32), then bicubic to short side 16 and center crop
    assert center_crop_arr(Image.new("RGB", (64, 32)), 16).size == (16, 16)


def test_extract_writes_manifest_and_reports_corrupt_images(cache, image_folder, tiny_vae_dir):
    out, manifest = cache
    assert manifest.count == 12 and manifest.num_classes == 2 and manifest.class_names == ["ant", "bee"]
    assert manifest.latent_shape == [4, 8, 8] and manifest.flips == 2 and manifest.scale_factor == 0.18215
    skipped = [s for shard in manifest.shards for s in shard.skipped]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("broken.jpg")
    # the stored moments are the VAE posterior of the crop and of its mirror image
    vae = load_vae(str(tiny_vae_dir))
    first = sorted((image_folder / "ant").iterdir())[0]
    x = torch.from_numpy(np.asarray(center_crop_arr(Image.open(first).convert("RGB"), 16)).copy())
    x = x.permute(2, 0, 1)[None].float() / 127.5 - 1
    mean, std = encode_moments(vae, torch.cat([x, x.flip(-1)]))
    stored = np.load(out / "shard-00000.latents.npy")[0]  # (flips, 2, C, h, w)
    np.testing.assert_allclose(stored[:, 0], mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored[:, 1], std.numpy(), rtol=1e-5, atol=1e-6)


def test_extract_resumes_and_ranks_write_disjoint_shards(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    import dico.data.extract as ex

    encoded = []
    real = ex._encode_shard
    monkeypatch.setattr(ex, "_encode_shard", lambda *a, **k: (encoded.append(a[4]), real(*a, **k))[1])
    assert extract_latents(config(image_folder, tmp_path, tiny_vae_dir, rank=1, world_size=2)) is None
    assert encoded == [1, 3] and not (tmp_path / "manifest.json").exists()  # rank 0's shards still missing
    manifest = extract_latents(config(image_folder, tmp_path, tiny_vae_dir, rank=0, world_size=2))
    assert encoded == [1, 3, 0, 2] and manifest is not None and manifest.count == 12
    (tmp_path / "shard-00002.json").unlink()  # an interrupted shard: only it is redone
    extract_latents(config(image_folder, tmp_path, tiny_vae_dir))
    assert encoded == [1, 3, 0, 2, 2]


@pytest.fixture(scope="module")
def other_vae_dir(tmp_path_factory, tiny_vae_dir):
    """The tiny VAE with other weights and a config scaling factor of 0.5."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2)
    vae.register_to_config(scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "other-vae"
    vae.save_pretrained(path)
    return path


def test_extract_refuses_to_mix_vaes_or_settings_in_one_cache(cache, tmp_path, image_folder, other_vae_dir):
    """Resuming a cache with another VAE (weights), image size, flips or dtype stops before encoding anything;
    the manifest records the VAE's weights hash and the scale factor of the VAE's config."""
    out, manifest = cache
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for f in out.iterdir():
        (resumed / f.name).write_bytes(f.read_bytes())
    (resumed / "manifest.json").unlink()
    for change, match in (
        ({"vae": str(other_vae_dir)}, "vae_sha256"),
        ({"image_size": 24}, "image_size: 16"),
        ({"flips": False}, "flips: 2"),
        ({"dtype": "float16"}, "dtype"),
    ):
        with pytest.raises(ValueError, match=rf"shard-00000\.json was made with other settings .*{match}.*new --out"):
            extract_latents(config(image_folder, resumed, change.pop("vae", manifest.vae), **change))
    assert not (resumed / "manifest.json").exists()
    other = extract_latents(config(image_folder, tmp_path / "other", other_vae_dir))
    assert other.scale_factor == 0.5 and manifest.scale_factor == 0.18215  # the tiny VAE's config default
    assert len(other.vae_sha256) == 64 and other.vae_sha256 != manifest.vae_sha256
    assert extract_latents(config(image_folder, resumed, manifest.vae)).vae_sha256 == manifest.vae_sha256


def test_extract_resume_reencodes_shards_whose_images_changed(tmp_path, image_folder, tiny_vae_dir):
    """Two images added inside the folder shift every later shard's images: resuming the old cache gives exactly
    the cache a fresh extraction of the new folder gives."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    extract_latents(config(folder, tmp_path / "cache", tiny_vae_dir))
    for name in ("0_1a.png", "0_1b.png"):  # sorted between ant/0_1.png and ant/0_2.png
        Image.fromarray(np.full((20, 20, 3), 7 * len(name), np.uint8)).save(folder / "ant" / name)
    resumed = extract_latents(config(folder, tmp_path / "cache", tiny_vae_dir))
    fresh = extract_latents(config(folder, tmp_path / "fresh", tiny_vae_dir))
    assert resumed.count == fresh.count == 14
    assert [asdict(r) for r in resumed.shards] == [asdict(r) for r in fresh.shards]
    a, b = ShardedLatents(tmp_path / "cache"), ShardedLatents(tmp_path / "fresh")
    keys = list(range(2 * len(b)))
    assert all(torch.equal(a.__getitems__(keys)[k], b.__getitems__(keys)[k]) for k in ("x", "std", "y"))


def test_reader_returns_scaled_moments_and_labels(cache):
    out, _ = cache
    data = ShardedLatents(out, verify_checksums=True)
    raw = np.load(out / "shard-00001.latents.npy")
    batch = data.__getitems__([2 * 5 + 1, 2 * 0])  # image 5 mirrored, image 0
    np.testing.assert_allclose(batch["x"][0].numpy(), raw[1, 1, 0] * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(batch["std"][0].numpy(), raw[1, 1, 1] * 0.18215, rtol=1e-6)
    assert batch["y"].tolist() == [0, 0] and len(data) == 12 and data.labels().tolist() == [0] * 6 + [1] * 6


def test_corrupt_or_missing_cache_names_the_fix(cache, tmp_path):
    out, _ = cache
    with pytest.raises(FileNotFoundError, match=r"cli\.py extract"):
        ShardedLatents(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    lat = bad / "shard-00001.latents.npy"
    lat.write_bytes(lat.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="shard-00001"):
        ShardedLatents(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ShardedLatents(bad)


def test_labels_outside_the_classes_are_refused_when_the_data_is_opened(cache, tmp_path):
    """A label equal to num_classes is the model's null label: it would train, silently, as unconditional data."""
    out, _ = cache
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    num_classes = ShardedLatents(tmp_path).num_classes
    labels = np.load(tmp_path / "shard-00001.labels.npy")
    labels[2] = num_classes
    np.save(tmp_path / "shard-00001.labels.npy", labels)
    with pytest.raises(ValueError, match=rf"shard-00001\.labels\.npy .* class label {num_classes}, outside"):
        ShardedLatents(tmp_path)
    InMemoryLatents(np.zeros((3, 1, 4, 4)), [0, 9, 3], num_classes=10)
    for bad in (10, -1):
        with pytest.raises(ValueError, match=f"class label {bad}, outside \\[0, 9\\]"):
            InMemoryLatents(np.zeros((3, 1, 4, 4)), [0, bad, 3], num_classes=10)


def test_checksum_mismatch_is_detected(cache, tmp_path):
    out, _ = cache
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    arr = np.load(tmp_path / "shard-00000.latents.npy")
    arr[0, 0, 0, 0, 0, 0] += 1
    np.save(tmp_path / "shard-00000.latents.npy", arr)
    ShardedLatents(tmp_path)  # same size and shape: only the checksum notices
    with pytest.raises(ValueError, match="checksum"):
        ShardedLatents(tmp_path, verify_checksums=True)


def test_zeroed_bytes_in_a_shard_are_detected_without_checksums(cache, tmp_path):
    """A zeroed region keeps the file's size and shape (only checksums would notice); reading it fails, naming the
    shard, while the other shards read normally."""
    out, _ = cache
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "shard-00001.latents.npy"
    raw = bytearray(path.read_bytes())
    per_image = 2 * 2 * 4 * 8 * 8 * 4  # flips x (mean, std) x latent (4, 8, 8) x float32
    start = len(raw) - 3 * per_image  # the second image of the shard (cache index 5)
    raw[start : start + 512] = bytes(512)
    path.write_bytes(raw)
    data = ShardedLatents(tmp_path)
    all_keys = [2 * i + f for i in range(len(data)) for f in (0, 1)]
    data.__getitems__([k for k in all_keys if k // 2 != 5])
    with pytest.raises(ValueError, match=r"shard-00001\.latents\.npy holds zeroed bytes \(image 1 of the shard\)"):
        data.__getitems__(all_keys)


@pytest.mark.parametrize(("value", "image", "part"), [(np.nan, 2, 1), (np.inf, 0, 0), (-np.inf, 3, 1)])
def test_nan_or_inf_in_a_shard_is_refused_on_read_naming_the_shard_and_row(cache, tmp_path, value, image, part):
    """A NaN or inf in one posterior mean or std (one value of one flip) is refused when its row is read, naming the
    shard and the row; every other row reads normally."""
    out, _ = cache
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "shard-00001.latents.npy"  # cache indices 4..7
    arr = np.load(path)
    arr[image, 1, part, 2, 3, 4] = value
    np.save(path, arr)
    data = ShardedLatents(tmp_path)
    all_keys = [2 * i + f for i in range(len(data)) for f in (0, 1)]
    batch = data.__getitems__([k for k in all_keys if k // 2 != 4 + image])
    assert all(torch.isfinite(v).all() for v in batch.values())
    with pytest.raises(ValueError, match=rf"shard-00001\.latents\.npy holds NaN or inf \(image {image} of the shard\)"):
        data.__getitems__(all_keys)


def test_sampler_partitions_ranks_draws_flips_and_resumes():
    data = InMemoryLatents(np.zeros((10, 1, 4, 4)), np.arange(10) % 2, num_classes=2)
    full = EpochSampler(data, flips=2, seed=3)
    full.set_epoch(1)
    keys = list(full)
    assert sorted(k // 2 for k in keys) == list(range(10)) and {k % 2 for k in keys} == {0, 1}
    ranks = [EpochSampler(data, num_replicas=2, rank=r, flips=2, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    parts = [list(s) for s in ranks]
    assert sorted(parts[0] + parts[1]) == sorted(keys) and not set(parts[0]) & set(parts[1])
    resumed = EpochSampler(data, flips=2, seed=3)
    resumed.resume(epoch=1, samples_done=4)
    resumed.set_epoch(1)
    assert list(resumed) == keys[4:]
    resumed.set_epoch(2)
    assert len(list(resumed)) == 10  # the skip applies once


def test_digits_datamodule_split_and_state():
    dm = DigitsDataModule(batch_size=64, seed=0)
    train, val = dm.split()
    assert (
        len(train) + len(val) == 1797 and len(val) == round(0.1 * 1797) and not set(train.tolist()) & set(val.tolist())
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (64, 1, 8, 8) and batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert dm.sample_shape == (1, 8, 8) and dm.num_classes == 10 and dm.decoder == {"kind": "pixels"}
    with pytest.raises(ValueError, match="batch size"):
        DigitsDataModule(batch_size=32).train_dataloader().load_state_dict({"epoch": 0, "batches": 3, "batch_size": 64})


def test_latent_datamodule_reads_the_cache(cache):
    out, _ = cache
    dm = LatentDataModule(str(out), batch_size=4, val_fraction=0.2)
    assert dm.sample_shape == (4, 8, 8) and dm.num_classes == 2
    assert dm.decoder["kind"] == "vae" and dm.decoder["scale_factor"] == 0.18215
    local = LatentDataModule(str(out), vae="/models/sd-vae-ft-ema")  # a local copy of the cache's VAE
    assert (
        local.decoder["vae"] == "/models/sd-vae-ft-ema"
        and dm.decoder["vae"] == json.loads((out / "manifest.json").read_text())["vae"]
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "std", "y"} and batch["x"].shape == (4, 4, 8, 8)
    record = json.loads((out / "manifest.json").read_text())
    assert record["count"] == 12


def test_a_relative_vae_path_is_recorded_absolute(tmp_path, image_folder, tiny_vae_dir, monkeypatch):
    """``extract --vae`` and the datamodule's ``vae`` given relative to the working folder: the cache and the
    checkpoint's decoder record the absolute path, so that sampling from another folder finds the VAE."""
    from dico.pretrained import check_vae_available

    monkeypatch.chdir(tiny_vae_dir.parent)
    manifest = extract_latents(config(image_folder, tmp_path / "latents", tiny_vae_dir.name, shard_size=12))
    assert manifest is not None and manifest.vae == str(tiny_vae_dir.resolve())
    local = LatentDataModule(str(tmp_path / "latents"), vae=f"./{tiny_vae_dir.name}")
    monkeypatch.chdir(tmp_path)  # sampling elsewhere, offline
    decoders = [LatentDataModule(str(tmp_path / "latents")).decoder, local.decoder]
    assert [d["vae"] for d in decoders] == [str(tiny_vae_dir.resolve())] * 2
    for d in decoders:
        check_vae_available(d["vae"])
    assert LatentDataModule(str(tmp_path / "latents"), vae="org/hub-vae").decoder["vae"] == "org/hub-vae"


def test_data_imports_nothing_of_models_diffusion_or_evaluation():
    """dico/data is the floor below the rest: not one of its files imports dico.models, dico.diffusion or
    dico.evaluation (at module level or inside a function)."""
    import ast
    from pathlib import Path

    import dico.data

    above = ("dico.models", "dico.diffusion", "dico.evaluation")
    found = []
    for path in sorted(Path(dico.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"dico.{node.module or ''}" if node.level > 1 else f"dico.data.{node.module or ''}"]
                names = names if node.level else [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.startswith(above)]
    assert found == []


# ------------------------------------------------------------------------------------- scikit-image crops
def test_image_crops_are_the_images_pixels_one_class_each_and_heldout_regions_no_training_crop_touches():
    import skimage.data

    from dico.data.image_crops import IMAGES, heldout_column, image_crops

    crops = image_crops(train_per_image=50, heldout_per_image=8)
    assert crops.train_x.shape == (500, 1, 16, 16) and crops.heldout_x.shape == (80, 1, 16, 16)
    assert np.array_equal(np.bincount(crops.train_y), [50] * 10) and np.array_equal(
        np.bincount(crops.heldout_y), [8] * 10
    )
    assert crops.train_x.min() >= -1 and crops.train_x.max() <= 1
    for x, y, corners in [
        (crops.train_x, crops.train_y, crops.train_corners),
        (crops.heldout_x, crops.heldout_y, crops.heldout_corners),
    ]:
        for i in range(0, len(y), 7):  # every crop is its class's image at its corner
            image = getattr(skimage.data, IMAGES[y[i]])()
            r, c = corners[i]
            assert np.array_equal(np.round((x[i, 0] + 1) * 127.5).astype(np.uint8), image[r : r + 16, c : c + 16])
    for label, name in enumerate(IMAGES):
        start = heldout_column(getattr(skimage.data, name)().shape[1], 16, 0.25)
        train_right = crops.train_corners[crops.train_y == label, 1] + 16
        heldout_left = crops.heldout_corners[crops.heldout_y == label, 1]
        assert train_right.max() <= start <= heldout_left.min()  # column ranges never overlap
        assert len({tuple(c) for c in crops.heldout_corners[crops.heldout_y == label]}) == 8  # distinct tiles


def test_image_crops_are_deterministic_and_the_crop_seed_moves_only_the_training_crops():
    from dico.data.image_crops import image_crops

    a, b = image_crops(train_per_image=20, heldout_per_image=4), image_crops(train_per_image=20, heldout_per_image=4)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    c = image_crops(train_per_image=20, heldout_per_image=4, crop_seed=1)
    assert not np.array_equal(a.train_corners, c.train_corners)
    assert np.array_equal(a.heldout_x, c.heldout_x)  # the held-out set does not depend on any seed


def test_image_crops_datamodule_validates_and_tests_on_the_heldout_crops_only():
    from dico.data import ImageCropsDataModule
    from dico.data.image_crops import image_crops

    dm = ImageCropsDataModule(train_per_image=30, heldout_per_image=6, batch_size=16, seed=3)
    assert dm.num_classes == 10 and dm.sample_shape == (1, 16, 16) and dm.decoder == {"kind": "pixels"}
    train, heldout = dm.split()
    assert len(train) == 300 and len(heldout) == 60
    crops = image_crops(train_per_image=30, heldout_per_image=6)
    val = torch.cat([b["x"] for b in dm.val_dataloader()])
    assert torch.equal(val, torch.from_numpy(crops.heldout_x))  # whatever the data seed
    first = next(iter(dm.train_dataloader()))["x"]
    assert all((first[i] == torch.from_numpy(crops.train_x)).flatten(1).all(1).any() for i in range(len(first)))
