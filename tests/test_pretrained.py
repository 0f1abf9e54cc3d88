"""Released checkpoints: the catalogue, hub resolution (a real huggingface_hub cache on disk, offline), every
published format through ``sample`` -> ADM npz -> ``evaluate``, model-info, safe loading and fine-tuning."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer

import cli
from dico.callbacks import EMA
from dico.checkpoints import (
    LIGHTNING,
    STATE_DICT,
    TRAINING,
    checkpoint_format,
    inspect_checkpoint,
    load_official,
    read_checkpoint,
)
from dico.data.vae import decode_latents, load_vae
from dico.diffusion import generate, sampling_diffusion
from dico.evaluation.images import load_npz, save_npz, to_uint8
from dico.evaluation.protocol import file_sha256
from dico.models.official import registered_name
from dico.module import DiffusionModule
from dico.pretrained import CATALOGUE, find_release
from dico.sample_jobs import load_for_sampling
from tests.conftest import ROOT

STEPS, CFG, BATCH, COUNT = 3, 1.5, 2, 4
FORMATS = ["dico-state-dict", "dico-training", "dit-state-dict", "dit-training", "lightning"]


def shifted(state_dict: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    return {k: v + by if v.is_floating_point() else v for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def standins(tmp_path_factory, golden) -> dict[str, Path]:
    """The golden published models written in every published format; training checkpoints hold different
    "model" (non-EMA) weights so that taking the wrong ones shows, and the published scripts' argparse args."""
    root = tmp_path_factory.mktemp("released")
    files = {}
    for arch in ("dico", "dit"):
        sd = golden[arch]["state_dict"]
        files[f"{arch}-state-dict"] = root / f"{arch}.pt"
        torch.save(sd, files[f"{arch}-state-dict"])
        param = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([param])
        param.grad = torch.ones(3)
        opt.step()
        args = argparse.Namespace(
            model="DiCo-S" if arch == "dico" else "DiT-S/2",
            image_size=128,
            global_seed=0,
            results_dir="results",
            ckpt=None,
            tf32=False,
        )
        files[f"{arch}-training"] = root / f"{arch}-training.pt"
        torch.save(
            {"model": shifted(sd, 0.05), "ema": sd, "opt": opt.state_dict(), "args": args}, files[f"{arch}-training"]
        )
    module = load_for_sampling(str(files["dico-state-dict"]), image_size=128)
    files["lightning"] = root / "ours.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": "2.6.0",
        },
        files["lightning"],
    )
    return files


def expected_samples(golden, arch: str, vae_dir: Path, cfg_scale: float) -> np.ndarray:
    """``load_official`` + our sampler + the VAE, batch by batch as the sample job seeds them."""
    g = golden[arch]
    model = load_official(g["state_dict"], arch, **({"num_heads": 4} if arch == "dit" else {"input_size": 16}))
    model.eval()
    size = model.input_size
    vae = load_vae(str(vae_dir))
    out = []
    for start in range(0, COUNT, BATCH):
        labels = torch.arange(start, start + BATCH) % model.num_classes
        z = generate(
            model,
            labels,
            (4, size, size),
            model.null_label,
            sampler="iddpm",
            steps=STEPS,
            cfg_scale=cfg_scale,
            guidance_mode="official",
            seed=start,
            diffusion=sampling_diffusion("iddpm", STEPS),
        )
        out.append(to_uint8(decode_latents(vae, z)))
    return np.concatenate(out)


def sample(ckpt: Path, out: Path, vae_dir: Path, *extra: str) -> np.ndarray:
    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                "--num_samples",
                str(COUNT),
                "--batch_size",
                str(BATCH),
                "--steps",
                str(STEPS),
                "--vae",
                str(vae_dir),
                "--accelerator",
                "cpu",
                "--devices",
                "1",
                "--labels",
                "balanced",
                *extra,
            ]
        )
        == 0
    )
    images, labels = load_npz(out / "samples.npz")
    assert labels.tolist() == [i % 10 for i in range(COUNT)]
    return images


def assert_same_images(images: np.ndarray, want: np.ndarray) -> None:
    assert images.shape == want.shape
    # one uint8 level: a value on a rounding boundary may round either way on another CPU's kernels
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_from_each_published_format(fmt, standins, golden, tiny_vae_dir, tmp_path, capsys):
    arch = "dit" if fmt.startswith("dit") else "dico"
    extra = ["--model_kwargs", '{"num_heads": 4}'] if arch == "dit" else ["--image_size", "128"]
    images = sample(standins[fmt], tmp_path / "samples", tiny_vae_dir, "--cfg_scale", str(CFG), *extra)
    said = capsys.readouterr().out
    kind = {
        "dico-state-dict": "published DiCo state dict",
        "dit-state-dict": "published DiT state dict",
        "dico-training": "published DiCo training checkpoint",
        "dit-training": "published DiT training checkpoint",
        "lightning": "dico Lightning checkpoint",
    }[fmt]
    assert kind in said
    assert ("EMA weights" in said) == fmt.endswith("training")
    assert_same_images(images, expected_samples(golden, arch, tiny_vae_dir, CFG))


def test_a_relative_vae_is_recorded_absolute_and_the_job_resumes_from_another_folder(
    standins, tiny_vae_dir, tmp_path, monkeypatch
):
    """``sample --vae`` relative to the working folder: ``samples.json`` records the folder's absolute path, so the
    same job run again from elsewhere (by the absolute path) is recognised as the same one, not refused as another."""
    out = tmp_path / "samples"
    monkeypatch.chdir(tiny_vae_dir.parent)
    first = sample(standins["lightning"], out, Path(tiny_vae_dir.name))
    record = json.loads((out / "samples.json").read_text())
    assert record["vae"] == record["decoder"]["vae"] == str(tiny_vae_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert np.array_equal(sample(standins["lightning"], out, tiny_vae_dir.resolve()), first)


def test_a_release_file_through_sample_npz_and_evaluate(
    standins, golden, tiny_vae_dir, inception_weights, tmp_path, capsys
):
    """A training checkpoint named as a release: the release's guidance scale by default, samples equal to
    ``load_official`` + our sampler, evaluated against an ADM reference batch, with the published figure beside."""
    released = tmp_path / "DiCo-XL-3750K-256x256.pt"
    released.write_bytes(standins["dico-training"].read_bytes())
    out = tmp_path / "samples"
    images = sample(released, out, tiny_vae_dir, "--image_size", "128")
    assert "release DiCo-XL-3750K" in capsys.readouterr().out
    want = expected_samples(golden, "dico", tiny_vae_dir, CATALOGUE["DiCo-XL-3750K"].cfg_scale)
    assert_same_images(images, want)

    reference, spec = tmp_path / "ref.npz", ["--weights_path", str(inception_weights), "--device", "cpu"]
    batch = save_npz(tmp_path / "reference_batch.npz", want)  # the ADM reference batch of this test
    assert cli.main(["reference", "--source", str(batch), "--out", str(reference), *spec]) == 0
    # a stand-in of another architecture named as the release is not the release: compared only when asked
    assert (
        cli.main(
            [
                "evaluate",
                "--samples",
                str(out / "samples.npz"),
                "--reference",
                str(reference),
                *spec,
                "--out",
                str(tmp_path / "record.json"),
                "--pretrained",
                "DiCo-XL-3750K",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["count"] == COUNT
    assert record["metrics"]["frechet_inception_distance"] == pytest.approx(0.0, abs=1e-2)  # the same images
    said = capsys.readouterr().out
    assert "DiCo-XL-3750K: FID 0.00, IS" in said and "published 2.05" not in said  # not printed as a match
    assert "not comparable with the published figures: Inception weights file sha256 " in said
    assert f"; reference {batch} (computed from the 4 images" in said
    assert f"num_samples {COUNT} (published: 50000); steps {STEPS} (published: 250)" in said
    assert "labels balanced (published: uniform)" in said and not record["published_comparison"]["comparable"]
    # what made the samples and the scores, by content: the weights file, the batch's images, the release's EMA
    # weights, the precision and the VAE (here: a stand-in Inception file, a 4-image batch, a tiny VAE)
    job = record["sample_job"]
    assert job["pretrained"] is None and job["ema"] is True and job["precision"] == "32-true"
    assert job["checkpoint"]["format"] == TRAINING and job["decoder"]["vae"] == str(tiny_vae_dir)
    assert f"samples of {released} (compared with: the release DiCo-XL-3750K)" in said
    assert f"Inception weights file sha256 {file_sha256(inception_weights)} (published: " in said
    assert "reference of 4 images (published: VIRTUAL_imagenet256_labeled.npz's 10000)" in said
    assert f"reference resolution {record['reference']['image_size']} (published: 256x256)" in said
    assert f"VAE {tiny_vae_dir} x 0.18215 (published: stabilityai/sd-vae-ft-ema x 0.18215)" in said
    assert "EMA weights" not in said.split("not comparable")[1]
    assert "precision" not in said.split("not comparable")[1]


def test_training_checkpoint_weights_and_args(standins, golden):
    ema = inspect_checkpoint(str(standins["dico-training"]))
    raw = inspect_checkpoint(str(standins["dico-training"]), use_ema=False)
    key = "x_embedder.proj.weight"
    assert torch.equal(ema.state_dict[key], golden["dico"]["state_dict"][key])
    assert torch.equal(raw.state_dict[key], golden["dico"]["state_dict"][key] + 0.05)
    assert ema.model_kwargs["input_size"] == 128 // 8  # DiCo's latent size from the checkpoint's args.image_size
    assert [checkpoint_format(read_checkpoint(standins[f])) for f in FORMATS] == [
        STATE_DICT,
        TRAINING,
        STATE_DICT,
        TRAINING,
        LIGHTNING,
    ]
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint_format({"epoch": 3, "note": "hello"})


def test_unsafe_objects_are_refused_without_the_opt_in(tmp_path, golden):
    path = tmp_path / "odd.pt"
    torch.save({"model": golden["dico"]["state_dict"], "args": Path("/etc")}, path)  # a class not allowed
    with pytest.raises(ValueError, match="unsafe_full_unpickle"):
        inspect_checkpoint(str(path))
    assert inspect_checkpoint(str(path), unsafe_full_unpickle=True).format == TRAINING


class CallsOnLoad:
    """Unpickling it calls ``os.mkdir(path)``: a stand-in for a payload that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return os.mkdir, (str(self.path),)


def test_a_pickle_that_runs_code_is_refused_as_needing_full_unpickling_not_as_corrupt(tmp_path, golden, capsys):
    """A checkpoint whose unpickling would call a function is refused in one line that names the opt-in, without
    calling it; it is not described as a truncated or corrupt file."""
    path = tmp_path / "payload.pt"
    torch.save({"state_dict": golden["dico"]["state_dict"], "x": CallsOnLoad(tmp_path / "ran")}, path)
    assert cli.entry(["model-info", "--ckpt", str(path)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "payload.pt holds objects that safe loading refuses" in line and "--unsafe_full_unpickle true" in line
    assert "corrupt" not in line and not (tmp_path / "ran").exists()


def test_unreadable_checkpoint_files_are_named_as_such(tmp_path, monkeypatch):
    """Truncated, empty and garbage files: one message naming the file and the fix, from the tools and from a
    Lightning command's --ckpt_path (before anything is built), instead of torch's EOFError / KeyError / miniz text."""
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    data = good.read_bytes()
    files = {"truncated.ckpt": data[: len(data) // 2], "empty.ckpt": b"", "garbage.ckpt": bytes(range(256)) * 8}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a readable checkpoint .*Pass another file"):
            inspect_checkpoint(str(tmp_path / name))
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"truncated\.ckpt is not a readable checkpoint"):
        cli.main(["fit", "-c", "experiments/quickstart.yaml", "--ckpt_path", str(tmp_path / "truncated.ckpt")])


def test_architecture_is_inferred_as_the_registered_size():
    published_xl = {
        "hidden_size": 416,
        "depth": [9, 9, 10, 9, 9],
        "mlp_ratio": 2.0,
        "in_channels": 4,
        "learn_sigma": True,
        "num_classes": 1000,
        "input_size": 32,
    }
    assert registered_name("dico", published_xl) == ("DiCo-XL", {})
    dit_512 = {
        "hidden_size": 1152,
        "depth": 28,
        "patch_size": 2,
        "in_channels": 4,
        "mlp_ratio": 4.0,
        "learn_sigma": True,
        "num_classes": 1000,
        "input_size": 64,
        "num_heads": 16,
    }
    assert registered_name("dit", dit_512) == ("DiT-XL/2", {"mlp_ratio": 4.0, "input_size": 64})
    name, overrides = registered_name("dico", {**published_xl, "hidden_size": 32})
    assert name == "DiCo-S" and overrides["hidden_size"] == 32 and overrides["depth"] == [9, 9, 10, 9, 9]


def test_catalogue_figures_are_the_published_ones(paper):
    rows = {r["model"]: r for r in paper["table1_imagenet256_400k_no_cfg"]}
    for size in "SBL":
        release = CATALOGUE[f"DiCo-{size}-400K"]
        assert (release.fid, release.inception_score, release.cfg_scale) == (
            rows[f"DiCo-{size}"]["fid"],
            rows[f"DiCo-{size}"]["is"],
            1.0,
        )
    assert CATALOGUE["DiCo-XL-400K"].fid == rows["DiCo-XL"]["fid"] == 11.67
    xl = CATALOGUE["DiCo-XL-3750K"]
    assert (xl.fid, xl.inception_score, xl.cfg_scale) == (2.05, 282.17, 1.4)
    assert rows["DiCo-XL (cfg 1.4, 3750K steps)"]["fid"] == xl.fid
    assert CATALOGUE["DiT-XL-2-256"].fid == rows["DiT-XL/2 (cfg)"]["fid"]
    table2 = {r["model"]: r for r in paper["table2_imagenet512"]}
    assert CATALOGUE["DiT-XL-2-512"].inception_score == table2["DiT-XL/2 (cfg)"]["is"]
    assert find_release("/somewhere/DiCo-XL-3750K-256x256.pt") is xl


def hub_cache(home: Path, repo: str, filename: str, source: Path) -> Path:
    """huggingface_hub's cache layout: blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main = commit."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "4c3a0b6f0d2e8a1b9c7d5e3f1a2b4c6d8e0f1a2b"
    blob = root / "blobs" / "5e2f9c1d7a3b"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(source.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot / filename


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_release_names_resolve_through_the_hub_cache_offline(standins, golden, tmp_path):
    home = tmp_path / "hf"
    cached = hub_cache(home, "shallowdream204/DiCo", "DiCo-S-400K-256x256.pt", standins["dico-state-dict"])
    done = run_cli("model-info", "--pretrained", "DiCo-S-400K", "--image_size", "128", "--json", home=home)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert Path(info["checkpoint"]) == cached and info["release"] == "DiCo-S-400K" and info["format"] == STATE_DICT
    assert info["published"]["fid"] == 49.97 and info["input_shape"] == [4, 16, 16]
    stand_in = load_official(golden["dico"]["state_dict"], "dico")
    assert info["params"] == sum(p.numel() for p in stand_in.parameters())

    no_vae = run_cli("sample", "--pretrained", "DiCo-S-400K", "--out", str(tmp_path / "s"), home=home)
    assert no_vae.returncode == 1 and "Traceback" not in no_vae.stderr and not (tmp_path / "s").exists()
    assert "`hf download stabilityai/sd-vae-ft-ema`" in no_vae.stderr and "--vae PATH" in no_vae.stderr

    missing = run_cli("model-info", "--pretrained", "DiCo-XL-3750K", home=home)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "DiCo-XL-3750K-256x256.pt" in missing.stderr
    assert "`hf download shallowdream204/DiCo DiCo-XL-3750K-256x256.pt`" in missing.stderr
    assert str(home / "hub") in missing.stderr


def test_a_release_not_cached_offline_names_the_option_that_takes_the_file(tmp_path, monkeypatch, capsys):
    """``test --ckpt_path RELEASE`` or ``fit --model.pretrained RELEASE`` offline without the file: one line with the
    download command and the option that takes the file instead (``--ckpt`` is the tools' option)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["-c", str(ROOT / "experiments" / "quickstart.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")]
    download = "`hf download shallowdream204/DiCo DiCo-S-400K-256x256.pt`, or pass the file with"
    for command, option in (("test", "--ckpt_path"), ("fit", "--model.pretrained")):
        assert cli.entry([command, *args, "--trainer.logger", "false", option, "DiCo-S-400K"]) == 1
        [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert f"{download} {option} PATH." in line


def test_fine_tuning_starts_from_the_released_model_and_ema(standins, golden, tmp_path):
    """``pretrained`` with a training checkpoint: training continues from its "model" weights, the EMA from its
    "ema" weights; sampling outside fit uses the EMA weights."""
    config = {**golden["dico"]["config"], "input_size": 16}
    module = DiffusionModule("DiCo-S", model_kwargs=config, lr=1e-4, pretrained=str(standins["dico-training"]))
    key, sd = "stem.weight", golden["dico"]["state_dict"]
    assert torch.equal(module.model.stem.weight, sd["x_embedder.proj.weight"])  # EMA weights for sampling
    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer, pl_module):
            ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
            seen["model"] = pl_module.model.state_dict()[key].clone()
            seen["ema"] = ema._average_model.module.model.state_dict()[key].clone()

    batches = [{"x": torch.randn(2, 4, 16, 16), "y": torch.tensor([1, 2])}]
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[EMA(decay=0.9), Look()],
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    torch.testing.assert_close(seen["model"], sd["x_embedder.proj.weight"] + 0.05, rtol=0, atol=0)
    torch.testing.assert_close(seen["ema"], sd["x_embedder.proj.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="the weights are DiCo-S"):
        DiffusionModule("DiCo-S", model_kwargs={"hidden_size": 16}, pretrained=str(standins["dico-state-dict"]))


def test_the_test_protocol_on_a_released_file(golden, image_folder, tiny_vae_dir, inception_weights, tmp_path, capsys):
    """``test --ckpt_path RELEASED_FILE``: the weights go into the configured model, the FID protocol samples with
    them (equal to ``load_official`` + our sampler) and the published figure is printed beside ours."""
    from dico.data import ExtractConfig, extract_latents

    latents = tmp_path / "latents"  # 4-channel 8x8 latents of 2 classes (the tiny VAE halves 16x16 images)
    extract_latents(
        ExtractConfig(
            str(image_folder), str(latents), image_size=16, vae=str(tiny_vae_dir), num_workers=0, progress=False
        )
    )
    two_classes = dict(golden["dico"]["state_dict"])  # the golden DiCo cut to classes 0, 1 and the null label
    for i in range(3):
        key = f"y_embedder.embedding_table_{i}.weight"
        two_classes[key] = two_classes[key][[0, 1, 10]].clone()
    released = tmp_path / "DiCo-S-400K-256x256.pt"
    torch.save(two_classes, released)
    reference = tmp_path / "reference.npz"
    spec = ["--weights_path", str(inception_weights), "--device", "cpu"]
    batch = save_npz(tmp_path / "batch.npz", np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    assert cli.main(["reference", "--source", str(batch), "--out", str(reference), *spec]) == 0
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
        },
        "fid": {
            "init_args": {
                "reference": str(reference),
                "weights_path": str(inception_weights),
                "test_num_samples": 4,
                "batch_size": 2,
                "test_steps": STEPS,
                "labels": "balanced",
            }
        },
        "model": {
            "model": "DiCo-S",
            "cfg_scale": 1.0,
            "model_kwargs": {"hidden_size": 32, "depth": [1] * 5, "num_classes": 2, "input_size": 8},
        },
        "data": {
            "class_path": "dico.data.LatentDataModule",
            "init_args": {"root": str(latents), "batch_size": 4, "val_fraction": 0.5},
        },
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["test", "-c", str(tmp_path / "config.yaml"), "--ckpt_path", str(released)]) == 0
    said = capsys.readouterr().out
    assert "DiCo-S-400K-256x256.pt (release DiCo-S-400K): a published DiCo state dict" in said
    assert "DiCo-S-400K: FID" in said and "not comparable with the published figures" in said
    assert "num_samples 4 (published: 50000); steps 3 (published: 250)" in said and "49.97" not in said
    job = json.loads((tmp_path / "run" / "test" / "record.json").read_text())["sample_job"]
    assert job == {
        "pretrained": "DiCo-S-400K",
        "checkpoint": None,
        "ema": True,
        "precision": "32-true",
        "decoder": {"kind": "vae", "vae": str(tiny_vae_dir), "scale_factor": 0.18215},
    }

    model = load_official(two_classes, "dico", input_size=8).eval()
    vae, want = load_vae(str(tiny_vae_dir)), []
    for start in (0, 2):
        z = generate(
            model,
            torch.tensor([0, 1]),
            (4, 8, 8),
            model.null_label,
            steps=STEPS,
            seed=start,
            diffusion=sampling_diffusion("iddpm", STEPS),
        )
        want.append(to_uint8(decode_latents(vae, z)))
    images, _ = load_npz(tmp_path / "run" / "test" / "samples.npz")
    assert_same_images(images, np.concatenate(want))
