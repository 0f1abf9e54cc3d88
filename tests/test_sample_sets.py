"""Sample sets and their files (exact, resumable, keyed by the job), the evaluation protocol on one and two
ranks, the periodic-evaluation schedule, sample-job input errors, and DPM-Solver++ on the module's own process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import cli
from dico.callbacks import EMA, FIDEvaluation
from dico.data import DigitsDataModule
from dico.evaluation import FeatureSpec, Featurizer, Reference, SampleSet, SamplingOptions, compute_reference
from dico.evaluation.images import iter_npz_images
from dico.evaluation.protocol import evaluate, sample_batch
from dico.evaluation.small_classifier import COMMITTED
from dico.module import DiffusionModule
from tests.conftest import TINY_MODEL, cpu_trainer


def tiny_module(**kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, sampling_steps=3, clip_denoised=True, **kwargs)
    for p in module.model.head.parameters():
        torch.nn.init.normal_(p, std=0.5)  # a zero head would make every sample the same
    return module


@pytest.fixture(scope="module")
def digits_featurizer(tmp_path_factory) -> Featurizer:
    return Featurizer(FeatureSpec("dico-digits", str(tmp_path_factory.mktemp("clf") / "digits.pt")))


@pytest.fixture(scope="module")
def digits_reference(digits_featurizer):
    return compute_reference("digits", digits_featurizer, max_features=300)


def test_sample_set_layout_seeds_and_rank_split():
    s = SampleSet(10, 4, 3, seed=5, labels="balanced")
    assert s.num_batches == 4 and s.rank_batches(0, 2) == [0, 2] and s.rank_batches(1, 2) == [1, 3]
    batch = s.batch(3)
    assert batch["index"].tolist() == [9] and batch["y"].tolist() == [1]
    assert batch["seed"] == 5 * 1_000_003 + 9  # the seeds of sample sets made before the SampleSet refactor
    uniform = SampleSet(10, 4, 3, seed=5, labels="uniform")
    assert torch.equal(uniform.batch(1)["y"], uniform.batch(1)["y"]) and uniform.batch(1)["y"].max() < 4
    assert not torch.equal(torch.cat([uniform.batch(b)["y"] for b in range(4)]), torch.arange(10) % 4)
    assert [len(b["index"]) for b in SampleSet(10, 4, 3).dataset(skip={1})] == [3, 3, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"labels": "random"}, "labels must be one of"),
    ],
)
def test_bad_sample_sets_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleSet(**{"num_samples": 10, "num_classes": 4, "batch_size": 3, **kwargs})


def test_sampling_options_resolve_against_the_module_without_changing_it():
    module = tiny_module(cfg_scale=1.5, guidance_mode="all")
    before = dict(module.hparams)
    options = SamplingOptions(steps=7).resolved(module.hparams)
    assert options == SamplingOptions("iddpm", 7, 1.5, "all", 0.0)
    assert dict(module.hparams) == before
    with pytest.raises(ValueError, match=r"cfg_scale must be >= 0.*1\.5"):
        SamplingOptions(cfg_scale=-1.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SamplingOptions(steps=0)


def test_sample_set_is_the_same_on_one_and_two_processes():
    module = tiny_module()
    s = SampleSet(10, 10, 3, seed=5).with_options(SamplingOptions(steps=4))
    one = {b: sample_batch(module, s, b)[0] for b in s.rank_batches(0, 1)}
    two = {b: sample_batch(module, s, b)[0] for r in (0, 1) for b in s.rank_batches(r, 2)}
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one[0][0], one[0][1])


def test_parts_are_keyed_by_the_job_and_merge_exactly_the_set(tmp_path, digits_featurizer, digits_reference):
    """Rerunning an evaluation in the same folder with another batch size must not leak the first run's parts
    into samples.npz; an interrupted write (hidden temp part) is ignored; a missing part is refused."""
    module = tiny_module()
    for batch_size in (4, 7):
        s = SampleSet(15, 10, batch_size, seed=1, labels="balanced")
        record = evaluate(module, s, digits_reference, digits_featurizer, samples_dir=tmp_path, source="ckpt@3")
        with np.load(record["samples"]) as data:
            assert data["arr_0"].shape == (15, 8, 8, 1) and data["arr_1"].tolist() == [i % 10 for i in range(15)]
    assert len(list((tmp_path / "parts").iterdir())) == 2  # one folder per job
    merged = np.concatenate(list(iter_npz_images(tmp_path / "samples.npz", 4)))  # streamed as ADM reads it
    with np.load(tmp_path / "samples.npz") as data:
        assert np.array_equal(merged, data["arr_0"])
    s = SampleSet(15, 10, 7, seed=1, labels="balanced").with_options(SamplingOptions().resolved(module.hparams))
    key = s.job_key("ckpt@3")
    (s.parts_dir(tmp_path, key) / ".000000007.npz.tmp").write_bytes(b"half a part")
    assert s.finished(tmp_path, key) == {0, 1, 2}
    s.part_path(tmp_path, key, 1).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 batches .* missing.*rerun"):
        s.merge(tmp_path, key)


def test_protocol_scores_once_and_records_the_conventions(tmp_path, digits_featurizer, digits_reference):
    module = tiny_module()
    record = evaluate(module, SampleSet(20, 10, 8), digits_reference, digits_featurizer)
    assert record["conventions"]["convention"] == "adm" and record["conventions"]["isc_split_size"] == 5000
    assert record["settings"]["steps"] == 3 and record["settings"]["labels"] == "uniform"
    assert set(record["metrics"]) >= {
        "frechet_inception_distance",
        "spatial_frechet_inception_distance",
        "inception_score_mean",
        "precision",
        "recall",
    }
    with pytest.raises(ValueError, match="cannot feed 4 devices"):

        class FourRanks:
            global_rank, world_size = 0, 4

        evaluate(module, SampleSet(20, 10, 8), digits_reference, digits_featurizer, trainer=FourRanks())


def fid_callback(tmp_path: Path, spec: FeatureSpec, **kwargs) -> FIDEvaluation:
    return FIDEvaluation(
        reference=str(tmp_path / "ref.npz"),
        reference_source="digits",
        feature_extractor="dico-digits",
        weights_path=spec.weights_path,
        num_samples=20,
        batch_size=10,
        **kwargs,
    )


def evaluated_steps(root: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (root / "eval").glob("step_*.json"))


def test_periodic_evaluation_schedule_with_accumulation_resume_and_test(tmp_path, digits_featurizer, capsys):
    """With accumulate_grad_batches=2 no unrequested step-0 evaluation; a resume at an evaluated step does not
    evaluate it again; the test record carries the checkpoint's step, and its metrics are printed as a table."""
    spec = digits_featurizer.spec

    def trainer(max_steps: int, **kwargs) -> Trainer:
        fid = fid_callback(tmp_path, spec, every_n_steps=2, save_best=True, test_num_samples=20, test_steps=2)
        callbacks = [EMA(decay=0.9), fid, ModelCheckpoint(tmp_path / "ckpt", save_last=True, every_n_train_steps=2)]
        return cpu_trainer(tmp_path, max_steps, callbacks, accumulate_grad_batches=2, **kwargs)

    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3, sampling_steps=2, clip_denoised=True)
    trainer(2).fit(module, DigitsDataModule(batch_size=64))
    assert evaluated_steps(tmp_path) == [2]
    (tmp_path / "eval" / "step_0000002.json").unlink()
    resumed = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, lr=1e-3, sampling_steps=2, clip_denoised=True)
    trainer(4).fit(resumed, DigitsDataModule(batch_size=64), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert evaluated_steps(tmp_path) == [4]  # step 2 was evaluated before the resume
    assert (tmp_path / "checkpoints" / "best_fid.ckpt").exists()
    test_module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, sampling_steps=2, clip_denoised=True)
    capsys.readouterr()
    trainer(4, limit_test_batches=1).test(
        test_module, DigitsDataModule(batch_size=64), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    record = json.loads((tmp_path / "test" / "record.json").read_text())
    assert record["step"] == 4 and record["settings"]["num_samples"] == 20
    assert record["feature_extractor"] == "dico-digits" and len(record["reference"]["weights_sha256"]) == 64
    title, *rows = capsys.readouterr().out.split("test protocol (20 samples")[1].splitlines()
    table = dict(row.split() for row in rows[: len(record["metrics"])])
    assert table == {name: f"{value:.6g}" for name, value in record["metrics"].items()} and "record.json" in title
    # what sampled: the checkpoint's EMA weights (it holds the live ones beside them), no release, in float32
    assert record["sample_job"] == {
        "pretrained": None,
        "checkpoint": str(tmp_path / "ckpt" / "last.ckpt"),
        "ema": True,
        "precision": "32-true",
        "decoder": {"kind": "pixels"},
    }
    periodic = json.loads((tmp_path / "eval" / "step_0000004.json").read_text())["sample_job"]
    assert periodic["ema"] is True and periodic["pretrained"] is None  # during fit: the EMA callback's average
    with np.load(tmp_path / "test" / "samples.npz") as data:
        assert len(data["arr_0"]) == 20


def test_a_reference_of_other_weights_fails_at_setup(tmp_path, digits_featurizer, digits_reference):
    digits_reference.save(tmp_path / "ref.npz")
    other = tmp_path / "other.pt"
    state = digits_featurizer.extractor.classifier.state_dict()
    torch.save({**state, "head.bias": state["head.bias"] + 1}, other)
    callback = fid_callback(tmp_path, FeatureSpec("dico-digits", str(other)), every_n_steps=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, sampling_steps=2)
    with pytest.raises(ValueError, match=r"weights_sha256.*--overwrite"):
        trainer.fit(module, DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0  # refused before training, sampling or featurising


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, sampling_steps=2, clip_denoised=True)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DigitsDataModule(batch_size=64))
    trainer.save_checkpoint(root / "model.ckpt")
    return root / "model.ckpt"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--num_samples", "0"], "num_samples must be >= 1"),
        (["--batch_size", "0"], "batch_size must be >= 1"),
        (["--cfg_scale", "-1"], "cfg_scale must be >= 0"),
        (["--steps", "5000"], "steps must be <= the model's 1000 diffusion steps"),
    ],
)
def test_sample_tool_rejects_bad_input_before_writing_and_the_rerun_works(tmp_path, tiny_ckpt, bad, message):
    args = [
        "sample",
        "--ckpt",
        str(tiny_ckpt),
        "--out",
        str(tmp_path / "s"),
        "--num_samples",
        "6",
        "--batch_size",
        "4",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
    ]
    with pytest.raises(ValueError, match=message):
        cli.main(args + bad)
    assert not (tmp_path / "s").exists()
    assert cli.main(args) == 0
    with np.load(tmp_path / "s" / "samples.npz") as data:
        assert data["arr_0"].shape == (6, 8, 8, 1)


@pytest.mark.parametrize(("schedule", "steps"), [("cosine", 1000), ("linear", 500)])
def test_dpm_solver_runs_on_the_module_process(schedule, steps):
    """The oracle denoiser of a one-point data set under the module's own process: DPM-Solver++ must land on
    the point and only ask for timesteps of that process (a hard-coded linear T=1000 scheduler does neither)."""
    from dico.diffusion import generate
    from dico.diffusion.sampling import sampling_diffusion

    diffusion = sampling_diffusion("dpm++", 20, steps, schedule)
    abar = torch.from_numpy(diffusion.alphas_cumprod)
    x0 = torch.linspace(-0.8, 0.8, 2 * 4 * 4 * 4).view(2, 4, 4, 4)
    seen = []

    def oracle(x, t, y):
        seen.append(int(t.max()))
        a = abar[t].float().view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * x0) / (1 - a).sqrt(), -torch.ones_like(x)], dim=1)

    out = generate(oracle, torch.tensor([0, 1]), (4, 4, 4), None, sampler="dpm++", steps=20, diffusion=diffusion)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert max(seen) == steps - 1


def test_dpm_solver_clips_the_denoised_prediction():
    from dico.diffusion import generate
    from dico.diffusion.sampling import sampling_diffusion

    diffusion = sampling_diffusion("dpm++", 10)
    abar = torch.from_numpy(diffusion.alphas_cumprod)
    x0 = torch.full((1, 1, 2, 2), 3.0)  # a data point outside [-1, 1]

    def oracle(x, t, y):
        a = abar[t].float().view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * x0) / (1 - a).sqrt(), -torch.ones_like(x)], dim=1)

    kwargs = dict(sampler="dpm++", steps=10, diffusion=diffusion)
    free = generate(oracle, torch.tensor([0]), (1, 2, 2), None, **kwargs)
    clipped = generate(oracle, torch.tensor([0]), (1, 2, 2), None, clip_denoised=True, **kwargs)
    torch.testing.assert_close(free, x0, rtol=0, atol=1e-3)
    assert clipped.max() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="respaced"):
        generate(
            oracle,
            torch.tensor([0]),
            (1, 2, 2),
            None,
            sampler="dpm++",
            steps=10,
            diffusion=sampling_diffusion("iddpm", 10),
        )


class GlooTrainer:
    """The few trainer attributes the protocol uses, over a gloo process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.global_rank, self.world_size = rank, world_size
        self.strategy = self

    root_device = torch.device("cpu")

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()


def _evaluate_on_rank(rank: int, world_size: int, port: int, weights: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    featurizer = Featurizer(FeatureSpec("dico-digits", weights))
    reference = compute_reference("digits", featurizer, max_features=300)
    record = evaluate(
        tiny_module(),
        SampleSet(20, 10, 6, seed=2),
        reference,
        featurizer,
        trainer=GlooTrainer(rank, world_size),
        samples_dir=out,
        source="ddp",
    )
    Path(out, f"record{rank}.json").write_text(json.dumps(record["metrics"]))
    torch.distributed.destroy_process_group()


def test_protocol_gives_the_same_metrics_and_samples_on_two_processes(tmp_path, digits_featurizer):
    """Batches split over two gloo ranks, features gathered through torchmetrics, scored once on rank 0 and
    broadcast: the same metrics on both ranks as on one process, and the same samples.npz."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    weights = digits_featurizer.spec.weights_path
    args = (2, port, weights, str(tmp_path / "two"))  # fork: the children need not import torch again
    torch.multiprocessing.start_processes(_evaluate_on_rank, args=args, nprocs=2, start_method="fork")
    reference = compute_reference("digits", digits_featurizer, max_features=300)
    one = evaluate(
        tiny_module(),
        SampleSet(20, 10, 6, seed=2),
        reference,
        digits_featurizer,
        samples_dir=tmp_path / "one",
        source="ddp",
    )
    two = [json.loads((tmp_path / "two" / f"record{r}.json").read_text()) for r in (0, 1)]
    assert two[0] == two[1]  # scored once on rank 0 and broadcast: bit-equal
    # The featurizer runs in float32 on other batch splits and thread counts in the two settings (a forked child
    # need not use the parent's thread count, and matmul blocking follows it): float32 rounding, not 1e-12. A lost
    # or duplicated sample moves these metrics by percents.
    assert two[0] == pytest.approx(one["metrics"], rel=1e-5, abs=1e-6)
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_an_outdated_reference_is_recomputed_from_its_source(tmp_path, digits_featurizer):
    old_meta = np.array(json.dumps({"feature_extractor": "dico-digits"}))  # format 1: no sFID statistics
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64), features=np.zeros((2, 64)), meta=old_meta)
    with pytest.raises(ValueError, match=r"older dico reference.*--overwrite"):
        Reference.load(tmp_path / "ref.npz")
    callback = fid_callback(tmp_path, digits_featurizer.spec)
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path)
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL)
    assert callback.reference(trainer, module).mu_s.shape == (112,)


def test_scored_samples_have_random_labels_by_default_and_the_records_say_so(tmp_path, tiny_ckpt):
    """The published sample_ddp.py draws each label uniformly at random; `sample`, `test` and the FID callback
    do the same by default (seeded per batch), and `balanced` is an option."""
    from dico.sample_jobs import SampleJob

    callback = FIDEvaluation(reference=str(tmp_path / "ref.npz"))
    assert callback.sample_set.labels == callback.test_set.labels == SampleJob().labels == "uniform"
    args = [
        "sample",
        "--ckpt",
        str(tiny_ckpt),
        "--num_samples",
        "40",
        "--batch_size",
        "8",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
    ]
    assert cli.main([*args, "--out", str(tmp_path / "u")]) == 0
    with np.load(tmp_path / "u" / "samples.npz") as data:
        labels = data["arr_1"]
    want = SampleSet(40, 10, 8, seed=0, labels="uniform")
    assert labels.tolist() == torch.cat([want.batch(b)["y"] for b in range(5)]).tolist()
    assert np.bincount(labels, minlength=10).tolist() != [4] * 10  # not the balanced layout
    assert json.loads((tmp_path / "u" / "samples.json").read_text())["labels"] == "uniform"
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--labels", "balanced"]) == 0
    with np.load(tmp_path / "b" / "samples.npz") as data:
        assert data["arr_1"].tolist() == [i % 10 for i in range(40)]


def test_a_cached_reference_of_another_source_is_refused_at_setup(tmp_path, digits_featurizer, digits_reference):
    from dico.evaluation.images import save_npz

    digits_reference.save(tmp_path / "ref.npz")
    batch = save_npz(tmp_path / "batch.npz", np.zeros((4, 8, 8, 1), np.uint8))
    spec = digits_featurizer.spec
    callback = FIDEvaluation(
        reference=str(tmp_path / "ref.npz"),
        reference_source=str(batch),
        feature_extractor="dico-digits",
        weights_path=spec.weights_path,
    )
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"made with source digits .*delete .*ref\.npz to recompute it from .*batch"):
        callback.reference(trainer, DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL))


def test_the_evaluate_record_carries_the_sample_job_and_the_samples_hash(
    tmp_path, tiny_ckpt, digits_reference, digits_featurizer
):
    import hashlib

    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                str(tiny_ckpt),
                "--out",
                str(tmp_path / "s"),
                "--num_samples",
                "6",
                "--batch_size",
                "4",
                "--cfg_scale",
                "1.5",
                "--accelerator",
                "cpu",
                "--devices",
                "1",
            ]
        )
        == 0
    )
    digits_reference.save(tmp_path / "ref.npz")
    samples = tmp_path / "s" / "samples.npz"
    assert (
        cli.main(
            [
                "evaluate",
                "--samples",
                str(samples),
                "--reference",
                str(tmp_path / "ref.npz"),
                "--feature_extractor",
                "dico-digits",
                "--weights_path",
                digits_featurizer.spec.weights_path,
                "--out",
                str(tmp_path / "record.json"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["samples_sha256"] == hashlib.sha256(samples.read_bytes()).hexdigest()
    assert record["settings"] == {
        "sampler": "iddpm",
        "steps": 2,
        "cfg_scale": 1.5,
        "guidance_mode": "official",
        "eta": 0.0,
        "num_samples": 6,
        "batch_size": 4,
        "seed": 0,
        "labels": "uniform",
    }
    assert record["sample_job"]["ckpt"] == str(tiny_ckpt) and record["sample_job"]["pretrained"] is None
    assert record["sample_job"]["checkpoint"] == {
        "path": str(tiny_ckpt),
        "format": "lightning",
        "sha256": hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest(),
    }
    assert record["sample_job"]["decoder"] == {"kind": "pixels"} and record["sample_job"]["precision"] == "32-true"
    assert record["sample_job"]["ema"] is False  # trained without the EMA callback
    assert record["feature_weights_file_sha256"] == COMMITTED["dico-digits"].sha256  # the weights file by content
    assert record["reference"]["count"] == 1797 and record["reference"]["image_size"] == [8, 8]  # scikit-learn's digits
    assert record["reference"]["statistics_sha256"] == digits_reference.statistics_sha256


def test_predict_with_the_sample_writer_gives_the_balanced_set(tmp_path):
    """The data module's predict batches (dico.data.label_batches, no import of evaluation) written by SampleWriter:
    exactly the class-balanced set, the same parts key as a SampleSet of that layout."""
    from dico.callbacks import SampleWriter

    writer = SampleWriter(str(tmp_path), source="tiny")
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = DigitsDataModule(predict_samples=12, val_batch_size=5, seed=3)
    trainer.predict(tiny_module(), data, return_predictions=False)
    with np.load(tmp_path / "samples.npz") as saved:
        assert saved["arr_0"].shape == (12, 8, 8, 1) and saved["arr_1"].tolist() == [i % 10 for i in range(12)]
    key = SampleSet(12, 10, 5, seed=3, labels="balanced").job_key("tiny")
    assert [p.name for p in (tmp_path / "parts").iterdir()] == [key]
