"""The notebooks' analysis functions (``dico.analysis``): attention capture and locality, channel activations,
metrics read back from runs, ablation results read back."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dico.analysis import attention as A
from dico.analysis import channels as C
from dico.analysis.notebook import notebook_settings
from dico.analysis.reports import paper_table, read_result_csv, read_results
from dico.analysis.runs import (
    Curve,
    class_grid,
    read_metrics,
    smooth,
    tile,
    train_or_load_quickstart,
)
from dico.analysis.training import noised_digits
from dico.checkpoints import load_official
from dico.diffusion import generate, sampling_diffusion
from dico.models import create_model
from dico.models.ablation import ABLATION_ROWS, TABLE3, TABLE4
from tests.numerics import assert_close


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the adaLN-Zero gates and heads start at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def small_dit(**kw) -> torch.nn.Module:
    args = dict(hidden_size=32, depth=3, num_heads=4, patch_size=1, input_size=8, in_channels=1, num_classes=10)
    return randomise(create_model("DiT-S/2", **{**args, **kw}))


def small_dico(name: str = "DiCo-S") -> torch.nn.Module:
    return randomise(
        create_model(name, hidden_size=16, depth=[2, 1, 1, 1, 2], in_channels=1, input_size=8, num_classes=10)
    )


def inputs(b: int = 3, c: int = 1, s: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, s, s, generator=g),
        torch.randint(0, 1000, (b,), generator=g),
        torch.randint(0, 10, (b,), generator=g),
    )


# ---------------------------------------------------------------------------------------------- attention capture
def test_captured_attention_rows_sum_to_one_and_reproduce_the_attention_output():
    model = small_dit()
    x, t, y = inputs()
    seen = {}
    block = model.blocks[1].mixer
    handle = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    with A.AttentionRecorder(model, average_heads=False) as rec:
        model(x, t, y)
    handle.remove()
    probs = rec.maps[1]  # (B, heads, N, N)
    assert probs.shape == (3, 4, 64, 64)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 64))
    assert (probs >= 0).all()
    # softmax(QK^T / sqrt(d)) V, heads merged, projected == what the block's attention returned
    tokens = seen["x"].flatten(1, 2)  # DiT's blocks run on a channels-last token grid (B, h, w, C)
    b, n, c = tokens.shape
    v = block.qkv(tokens).view(b, n, 3, 4, c // 4)[:, :, 2].transpose(1, 2)  # (B, heads, N, d)
    out = block.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    assert_close(out, seen["out"].flatten(1, 2), layers=4)  # qkv, scores, softmax @ v, proj
    assert not torch.allclose(probs, torch.full_like(probs, 1 / 64), atol=1e-3)  # not trivially uniform


def test_recorder_leaves_the_model_output_unchanged_and_removes_its_hooks():
    model = small_dit()
    x, t, y = inputs()
    before = model(x, t, y)
    with A.AttentionRecorder(model) as rec:
        during = model(x, t, y)
    assert torch.equal(before, during)
    assert all(not m._forward_hooks for m in model.modules())
    assert len(rec.maps) == 3 and rec.stacked().shape == (3, 3, 64, 64)


def test_average_heads_is_the_mean_over_heads():
    model = small_dit()
    x, t, y = inputs()
    per_head = A.capture_attention(model, x, t, y, average_heads=False)
    mean = A.capture_attention(model, x, t, y)
    assert per_head.shape == (3, 3, 4, 64, 64) and mean.shape == (3, 3, 64, 64)
    torch.testing.assert_close(per_head.mean(2), mean)


def test_attention_probabilities_match_torch_sdpa_with_patch_2():
    model = small_dit(patch_size=2)
    attn = model.blocks[0].mixer
    x = torch.randn(2, 16, 32)
    probs = A.attention_probabilities(attn, x)
    q, k, v = attn.qkv(x).view(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    assert_close(probs @ v, F.scaled_dot_product_attention(q, k, v), layers=3)
    assert A.token_grid(model) == (4, 4)


def test_recorder_rejects_models_without_dit_attention():
    with pytest.raises(TypeError, match="DiT"):
        A.AttentionRecorder(small_dico())


# ---------------------------------------------------------------------------------------------- locality
def test_locality_is_one_for_attention_on_the_anchor_only():
    grid = (5, 7)
    eye = torch.eye(35)
    for radius in (0, 1, 2.5):
        assert float(A.locality_score(eye, grid, radius)) == pytest.approx(1.0)
    assert float(A.locality_score(eye, grid, 0, metric="chebyshev")) == pytest.approx(1.0)


def count_within(grid, radius, metric):
    """Brute force: for each anchor, how many tokens lie within the radius."""
    h, w = grid
    counts = []
    for ay in range(h):
        for ax in range(w):
            n = 0
            for y in range(h):
                for x in range(w):
                    d = math.hypot(y - ay, x - ax) if metric == "euclidean" else max(abs(y - ay), abs(x - ax))
                    n += d <= radius
            counts.append(n)
    return np.array(counts)


@pytest.mark.parametrize("metric", ["euclidean", "chebyshev"])
@pytest.mark.parametrize("radius", [0, 1, 1.5, 2, 3])
def test_locality_of_uniform_attention_is_the_fraction_of_tokens_within_the_radius(radius, metric):
    grid = (4, 6)
    n = 24
    expected = count_within(grid, radius, metric) / n  # per anchor
    uniform = torch.full((2, n, n), 1.0 / n)
    score = A.locality_score(uniform, grid, radius, metric)
    assert score.shape == (2,)
    torch.testing.assert_close(score, torch.full((2,), expected.mean(), dtype=torch.float32))
    assert A.uniform_locality(grid, radius, metric) == pytest.approx(expected.mean())
    anchors = [0, 13, 23]
    sub = A.locality_score(uniform, grid, radius, metric, anchors=anchors)
    torch.testing.assert_close(sub, torch.full((2,), expected[anchors].mean(), dtype=torch.float32))


def test_locality_counts_distance_on_the_grid_not_in_token_order():
    grid = (4, 4)
    attn = torch.zeros(16, 16)
    anchor = A.grid_index(grid, 1, 1)
    attn[anchor, A.grid_index(grid, 3, 1)] = 1.0  # two rows down: index distance 8, grid distance 2
    assert float(A.locality_score(attn, grid, 1, anchors=[anchor])) == 0.0
    assert float(A.locality_score(attn, grid, 2, anchors=[anchor])) == 1.0
    attn2 = torch.zeros(16, 16)
    attn2[anchor, anchor + 1] = 1.0  # right neighbour
    assert float(A.locality_score(attn2, grid, 1, anchors=[anchor])) == 1.0
    assert A.anchor_map(attn, grid, anchor)[3, 1] == 1.0 and A.anchor_map(attn, grid, anchor).sum() == 1.0
    with pytest.raises(ValueError, match="grid"):
        A.locality_score(attn, (3, 5), 1)


# ---------------------------------------------------------------------------------------------- along sampling
def test_attention_along_sampling_records_without_changing_the_samples():
    model = small_dit()
    labels = [0, 3, 7]
    record = A.attention_along_sampling(model, labels, steps=6, num_records=3, seed=5)
    diffusion = sampling_diffusion("ddim", 6)
    plain = generate(
        model, torch.tensor(labels), (1, 8, 8), model.null_label, sampler="ddim", steps=6, seed=5, diffusion=diffusion
    )
    assert torch.equal(record.samples, plain)
    assert len(record.timesteps) == 3 and record.timesteps == sorted(record.timesteps, reverse=True)
    # from the first step (purest noise) to the last
    assert record.timesteps[0] == diffusion.timestep_map[-1] and record.timesteps[-1] == diffusion.timestep_map[0]
    assert record.stacked().shape == (3, 3, 3, 64, 64)  # timesteps, layers, samples, N, N
    summary = A.summarise_locality(record, radius=1.5)
    assert summary.per_layer_timestep.shape == (3, 3) and summary.per_layer.shape == (3,)
    assert 0 < summary.score < 1 and summary.uniform == pytest.approx(A.uniform_locality((8, 8), 1.5))
    _, scores, uniform = A.locality_curve(record, [0, 1, 20])
    assert scores[-1] == pytest.approx(1.0) and uniform[-1] == pytest.approx(1.0) and scores[0] < scores[1]


def test_guided_sampling_records_the_conditional_half():
    model = small_dit(class_dropout_prob=0.1)
    record = A.attention_along_sampling(model, [1, 2], steps=3, num_records=1, cfg_scale=4.0)
    assert record.stacked().shape == (1, 3, 2, 64, 64)


def test_locality_of_a_published_format_checkpoint_loaded_by_path(tmp_path, golden):
    """The notebook's DiT-XL/2 path, on the small published-format DiT of the golden material."""
    g = golden["dit"]
    path = tmp_path / "dit.pt"
    torch.save(g["state_dict"], path)
    model = load_official(str(path), "dit", num_heads=g["config"]["num_heads"]).eval()
    record = A.attention_along_sampling(model, [0, 1], steps=4, num_records=2)
    summary = A.summarise_locality(record, radius=1)
    assert record.grid == (4, 4) and summary.per_layer.shape == (g["config"]["depth"],)
    assert 0 < summary.score <= 1


# ---------------------------------------------------------------------------------------------- channels
def test_activation_scores_apply_relu_before_pooling():
    f = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [3.0, -1.0], [-3.0, -1.0]]).view(1, 2, 2, 2)  # (B, H, W, C)
    torch.testing.assert_close(C.activation_scores(f), torch.tensor([1.0, 0.0]))  # pooling first would give 0, 0
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])  # (B, N, C)
    torch.testing.assert_close(C.activation_scores(tokens), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("name", ["DiT", "DiCo-S", "DiCo-S-noCCA"])
def test_channel_scores_are_non_negative_per_channel_and_leave_the_model_unchanged(name):
    model = small_dit() if name == "DiT" else small_dico(name)
    x, t, y = inputs()
    before = model(x, t, y)
    scores = C.channel_activation_scores(model, x, t, y)
    width = 32 if name == "DiT" else 2 * 16  # DiT width; DiCo's last stage runs at 2D
    assert scores.shape == (width,) and (scores >= 0).all() and scores.sum() > 0
    assert torch.equal(model(x, t, y), before) and all(not m._forward_hooks for m in model.modules())


def test_channel_scores_follow_the_last_mixer_output():
    """Scaling the last mixer's output projection by 3 scales every score by 3; other layers' outputs don't count."""
    model = small_dico()
    x, t, y = inputs()
    base = C.channel_activation_scores(model, x, t, y)
    mixer = model.blocks()[-1].mixer
    assert C.last_mixer(model) is mixer
    with torch.no_grad():
        mixer.pw_out.weight.mul_(3)
        mixer.pw_out.bias.mul_(3)
    torch.testing.assert_close(C.channel_activation_scores(model, x, t, y), 3 * base)
    assert C.last_mixer(small_dit()) is not None


def test_capture_output_returns_the_submodule_output():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    torch.testing.assert_close(C.capture_output(model, model[1], x), torch.tanh(model[0](x)))


def test_sorted_normalised_and_inactive_fraction():
    s = torch.tensor([0.5, 2.0, 0.1, 1.0])
    torch.testing.assert_close(C.sorted_normalised(s), torch.tensor([1.0, 0.5, 0.25, 0.05]))
    assert C.inactive_fraction(s, 0.1) == 0.25 and C.inactive_fraction(s, 0.3) == 0.5


def test_first_stage_features_with_cca_reweight_channels_uniformly_over_space():
    """CCA multiplies each channel by one gate in (0, 1): output = gate * input at every position of a channel."""
    model = small_dico()
    x, t, y = inputs()
    block = model.encoder1[-1]
    before_cca = C.capture_output(model, block.mixer.act, x, t, y).permute(0, 3, 1, 2)
    after = C.first_stage_features(model, x, t, y, where="attention")
    assert after.shape == (3, 16, 8, 8)
    gate = (after * before_cca).sum((2, 3), keepdim=True) / before_cca.square().sum((2, 3), keepdim=True)
    assert_close(after, gate * before_cca, layers=3)  # pooling, 1x1 conv, the product
    assert ((gate > 0) & (gate < 1)).all() and gate.std() > 0.01  # channels get different gates
    without = small_dico("DiCo-S-noCCA")
    act = C.capture_output(without, without.encoder1[-1].mixer.act, x, t, y).permute(0, 3, 1, 2)
    torch.testing.assert_close(C.first_stage_features(without, x, t, y, where="attention"), act)
    assert C.first_stage_features(model, x, t, y).shape == (3, 16, 8, 8)  # the mixer output
    with pytest.raises(TypeError):
        C.first_stage_features(small_dit(), x, t, y)


def test_noised_digits_are_balanced_and_share_their_noise():
    (x0, t0, y0), (x1, t1, y1) = noised_digits([0, 999], per_class=2)
    assert x0.shape == (20, 1, 8, 8) and torch.equal(y0, y1) and np.bincount(y0.numpy()).tolist() == [2] * 10
    assert (t0 == 0).all() and (t1 == 999).all()
    assert x0.min() >= -1.1 and x0.max() <= 1.1  # barely noised: still digits in [-1, 1]
    assert x1.std() > 0.9  # nearly pure noise


# ---------------------------------------------------------------------------------------------- runs
def test_read_metrics_reads_sparse_lightning_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    lines = [
        "epoch,eval/fid,step,train/loss,val/loss",
        ",700.5,0,,",
        "0,,4,1.5,",
        "0,,9,1.25,",
        "0,,9,,1.4",
        ",300.25,9,,",
    ]
    path.write_text("\n".join(lines) + "\n")
    m = read_metrics(path)
    assert set(m) == {"eval/fid", "train/loss", "val/loss"}
    assert m["train/loss"].steps.tolist() == [4, 9] and m["train/loss"].values.tolist() == [1.5, 1.25]
    assert m["eval/fid"].steps.tolist() == [0, 9] and m["eval/fid"].last == 300.25
    assert len(m["val/loss"]) == 1


def test_read_metrics_of_a_real_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv", version="")
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.log_metrics({"eval/fid": 12.5}, step=4)
    logger.save()
    m = read_metrics(tmp_path / "csv" / "metrics.csv")
    assert m["train/loss"].steps.tolist() == list(range(5))
    np.testing.assert_allclose(m["train/loss"].values, [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert m["eval/fid"].steps.tolist() == [4]


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert Curve(np.array([1]), np.array([2.0])).last == 2.0


def test_tile_puts_image_k_at_row_k_div_cols():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 3) / 5 * 2 - 1
    grid = tile(images, 2, 3)
    assert grid.shape == (4, 9, 1)
    assert grid[0, 0, 0] == pytest.approx(0.0) and grid[0, 3, 0] == pytest.approx(0.2)
    assert grid[2, 0, 0] == pytest.approx(0.6) and grid[3, 8, 0] == pytest.approx(1.0)


def test_tiny_quickstart_is_an_overlay_of_the_quickstart(capsys):
    """The CI-sized quickstart composes as `cli.py fit -c quickstart.yaml -c quickstart-tiny.yaml --trainer...`."""
    import yaml

    import cli
    from dico.analysis.runs import quickstart_args, quickstart_config

    with pytest.raises(SystemExit):
        cli.main(["fit", *quickstart_args(steps=40, eval_every=20), "--print_config"])
    tiny = yaml.safe_load(capsys.readouterr().out)
    full = yaml.safe_load(quickstart_config().read_text())
    t = tiny["trainer"]
    assert t["max_steps"] == 40 and t["default_root_dir"] == full["trainer"]["default_root_dir"]
    assert [lg["class_path"].rsplit(".", 1)[-1] for lg in t["logger"]] == ["CSVLogger"]
    fid, checkpoint = tiny["fid"]["init_args"], tiny["checkpoint"]["init_args"]
    assert fid["every_n_steps"] == 20 and fid["num_samples"] == 50
    assert checkpoint["every_n_train_steps"] == 40
    assert checkpoint["dirpath"] == f"{full['trainer']['default_root_dir']}/checkpoints"
    assert tiny["model"]["sampling_steps"] == 10 and tiny["model"]["model"] == full["model"]["model"]
    assert quickstart_args() == ["-c", str(quickstart_config())]


def test_checkout_root_is_found_without_the_package_path(tmp_path, monkeypatch):
    from dico.analysis.notebook import checkout_root

    root = checkout_root()
    assert (root / "cli.py").is_file() and (root / "experiments" / "quickstart.yaml").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DICO_ROOT", str(root))
    assert checkout_root() == root
    monkeypatch.setenv("DICO_ROOT", str(tmp_path))  # not a checkout: the next candidates still find it
    assert checkout_root(root / "notebooks") == root


def test_train_or_load_quickstart_loads_an_existing_checkpoint(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    from dico.analysis import runs
    from dico.data import DigitsDataModule
    from dico.module import DiffusionModule

    model_kwargs = {"hidden_size": 8, "depth": [1, 1, 1, 1, 1], "in_channels": 1, "input_size": 8, "num_classes": 10}
    module = DiffusionModule("DiCo-S", model_kwargs=model_kwargs, sampling_steps=2, clip_denoised=True)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DigitsDataModule(batch_size=8))
    run_dir = runs.run_dir_of(tmp_path)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(runs, "train_quickstart", lambda *a, **k: pytest.fail("must load, not train"))
    loaded, where, trained = train_or_load_quickstart(tmp_path)
    assert not trained and where == run_dir and not loaded.training
    for k, v in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    grid = class_grid(loaded, per_class=2, steps=2)
    assert grid.shape == (80, 16, 1) and grid.min() >= 0 and grid.max() <= 1


# ---------------------------------------------------------------------------------------------- reports, settings
def test_read_results_parses_the_runner_csv(tmp_path):
    from ablations.report import write_report

    results = []
    for key, ratio, fid in [((TABLE4, "DiCo-S"), 1.0, 50.0), ((TABLE4, "w/o CCA"), 1.2, None)]:
        row = ABLATION_ROWS[key]
        size = {"params": 33_000_000, "gmacs": 4.2}
        r = {
            "row": row.row,
            "model": row.model,
            "seed": 0,
            "note": row.note,
            "shape": row.variant.shape,
            "deviation": row.deviation,
            "paper": row.paper,
            "model_kwargs": {},
            "trained_size": size,
            "reference_size": size,
            "throughput_ratio": ratio,
            "throughput_batch": 2,
            "sdpa_kernel": "math",
            "device": "cpu",
            "run_dir": "runs/x",
            "command": "python cli.py fit ...",
        }
        if fid is not None:
            r["metrics"] = {"frechet_inception_distance": fid}
        results.append(r)
    write_report("4", "structure", results, tmp_path, "python ablations/run.py ...")
    (tmp_path / "unrelated.csv").write_text("a,b\n1,2\n")
    [table] = read_results(tmp_path)
    assert (table.table, table.budget) == ("4", "structure") and table.column("row")[:2] == ["DiCo-S", "GELU->ReLU"]
    by_row = {r["row"]: r for r in table.rows}
    assert by_row["w/o CCA"]["throughput_ratio"] == pytest.approx(1.2) and by_row["DiCo-S"]["fid"] == 50.0
    assert math.isnan(by_row["w/o CCA"]["fid"]) and math.isnan(by_row["GELU->ReLU"]["throughput_ratio"])
    assert table.trained  # some row was scored (the rest of the table is not finished)
    assert by_row["DiCo-S"]["paper_fid"] == ABLATION_ROWS[TABLE4, "DiCo-S"].paper["fid"]
    with pytest.raises(ValueError, match="table3"):
        read_result_csv(tmp_path / "unrelated.csv")


@pytest.mark.parametrize("table,key", [("3", TABLE3), ("4", TABLE4)])
def test_paper_table_has_every_row_with_ratios_to_dico_s(table, key):
    rows = paper_table(table)
    assert [r["row"] for r in rows] == [row for (t, row) in ABLATION_ROWS if t == key]
    dico_s = next(r for r in rows if r["row"] in ("DiCo-S", "DiCo (U-shape)"))
    assert dico_s["throughput_ratio"] == 1.0 and all(r["throughput_ratio"] > 0 for r in rows)


def test_notebook_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("DICO_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("DICO_NOTEBOOK_WORKDIR", str(tmp_path / "w"))
    threads = torch.get_num_threads()
    try:
        nb = notebook_settings()
        assert nb.tiny and nb.workdir == tmp_path / "w" and nb.workdir.is_dir() and nb.pick(1, 2) == 1
        assert (nb.root / "dico" / "__init__.py").exists()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv("DICO_NOTEBOOK_WORKDIR")
    monkeypatch.setenv("DICO_NOTEBOOK_SIZE", "full")
    assert notebook_settings().workdir == notebook_settings().root
    monkeypatch.setenv("DICO_NOTEBOOK_SIZE", "huge")
    with pytest.raises(ValueError, match="tiny"):
        notebook_settings()


def test_read_metrics_refuses_other_csv_files(tmp_path):
    """read_metrics refuses files that are not metrics logs."""
    path = tmp_path / "x.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["a", "b"], ["1", "2"]])
    with pytest.raises(ValueError, match="step"):
        read_metrics(path)
