"""Diffusion: loss terms and sampler math against the published code's outputs; respacing; guidance."""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from dico.checkpoints import load_official
from dico.diffusion import (
    ClassifierFreeGuidance,
    create_diffusion,
    generate,
    guided,
    sampling_diffusion,
    space_timesteps,
)
from dico.models import DiCo


def constant_model(output: torch.Tensor):
    return lambda x, t, **kw: output


def test_training_loss_terms_match_published(golden):
    g = golden["loss"]
    diffusion = create_diffusion("")
    torch.testing.assert_close(diffusion.q_sample(g["x_start"], g["t"], g["noise"]), g["x_t"], rtol=1e-5, atol=1e-6)
    terms = diffusion.training_losses(constant_model(g["model_output"]), g["x_start"], g["t"], noise=g["noise"])
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(terms[key], g[key], rtol=1e-5, atol=0)
    assert (g["t"] == 0).any(), "the golden covers the decoder NLL at t = 0"


def test_vb_term_does_not_train_the_mean(golden):
    g = golden["loss"]
    output = g["model_output"].clone().requires_grad_()
    terms = create_diffusion("").training_losses(constant_model(output), g["x_start"], g["t"], noise=g["noise"])
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert grad[:, :4].abs().max() == 0 and grad[:, 4:].abs().max() > 0


@pytest.mark.parametrize(("key", "spec"), [("sample_250", "250"), ("sample_ddim50", "ddim50")])
def test_respaced_posterior_matches_published(golden, key, spec):
    g = golden[key]
    diffusion = create_diffusion(spec)
    assert diffusion.timestep_map == g["timestep_map"].tolist()
    np.testing.assert_allclose(diffusion.betas, g["betas"].numpy(), rtol=1e-12)
    seen = []
    model = lambda x, t, **kw: (seen.append(t), g["model_output"])[1]
    out = diffusion.p_mean_variance(model, g["x_t"], g["t_index"], clip_denoised=False)
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        torch.testing.assert_close(out[name], g[name], rtol=1e-5, atol=1e-6)
    # the model sees the original timesteps, not the respaced indices
    assert seen[0].tolist() == [g["timestep_map"][i].item() for i in g["t_index"]]


def test_ddim_step_matches_published(golden):
    g = golden["sample_ddim50"]
    out = create_diffusion("ddim50").ddim_sample(
        constant_model(g["model_output"]), g["x_t"], g["t_index"], clip_denoised=False
    )
    torch.testing.assert_close(out["sample"], g["ddim_eta0_sample"], rtol=1e-5, atol=1e-6)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "") == list(range(1000))
    assert len(space_timesteps(1000, "250")) == 250 and space_timesteps(1000, "250")[-1] == 999
    assert space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    assert space_timesteps(1000, [250]) == space_timesteps(1000, "250")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim3000")


def test_respaced_process_keeps_cumulative_alphas():
    full, spaced = create_diffusion(""), create_diffusion("250")
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_guided_forward_matches_published_cfg(golden):
    g = golden["dico"]
    c = g["cfg"]
    model = load_official(g["state_dict"], "dico").eval()
    # The published forward_with_cfg takes a doubled batch whose halves are equal; we take the half.
    assert torch.equal(c["x"][0], c["x"][1]) and c["y"][1] == model.null_label
    with torch.no_grad():
        out = ClassifierFreeGuidance(model, c["scale"], model.null_label, "official")(
            c["x"][:1], c["t"][:1], c["y"][:1]
        )
    torch.testing.assert_close(out, c["out"][:1], rtol=1e-5, atol=2e-5)


def test_guidance_modes_differ_only_in_the_fourth_noise_channel():
    torch.manual_seed(0)
    model = DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 7])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        official = ClassifierFreeGuidance(model, 4.0, 10, "official")(x, t, y)
        every = ClassifierFreeGuidance(model, 4.0, 10, "all")(x, t, y)
    expected = uncond + 4.0 * (cond - uncond)
    # The guided call runs one batch of 4, the reference two batches of 2: fp32 kernels may round differently at
    # another batch size (vectorised main loop vs. tail, matmul blocking), and guidance multiplies such differences
    # by up to 1 + 2 * scale = 9; hence atol 5e-5 on the guided channels.
    torch.testing.assert_close(every[:, :4], expected[:, :4], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(official[:, :3], expected[:, :3], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(official[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(every[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)
    assert guided(model, 1.0, 10, "all") is model
    with pytest.raises(ValueError, match="official"):
        guided(model, 2.0, 10, "some")


@pytest.mark.parametrize("sampler", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_loops_are_seeded_and_finite(sampler):
    torch.manual_seed(0)
    model = DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    diffusion = create_diffusion("10")
    y = torch.tensor([1, 2])
    cfg = ClassifierFreeGuidance(model, 2.0, 10)
    runs = [
        getattr(diffusion, sampler)(
            cfg, (2, 4, 8, 8), model_kwargs={"y": y}, generator=torch.Generator().manual_seed(7), clip_denoised=False
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()
    assert runs[0].shape == (2, 4, 8, 8)


def test_wrong_output_channels_name_the_fix():
    diffusion = create_diffusion("")
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="learn_sigma"):
        diffusion.training_losses(constant_model(torch.randn(2, 4, 8, 8)), x, torch.tensor([1, 2]))


@pytest.mark.parametrize(("sampler", "steps"), [("iddpm", 250), ("ddim", 50), ("dpm++", 20)])
def test_samplers_recover_the_data_point_with_an_oracle_denoiser(sampler, steps):
    """Data = one point x0: the exact noise predictor is eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), with
    the variance channel at the posterior variance (v = -1). Every correct sampler must then land on x0; a wrong
    schedule, timestep mapping or update rule would not."""
    from dico.diffusion import generate

    abar = torch.from_numpy(create_diffusion("").alphas_cumprod)
    x0 = torch.linspace(-0.8, 0.8, 2 * 4 * 4 * 4).view(2, 4, 4, 4)

    def oracle(x, t, y):
        a = abar[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    out = generate(oracle, torch.tensor([0, 1]), (4, 4, 4), null_label=None, sampler=sampler, steps=steps)
    torch.testing.assert_close(out, x0, rtol=0, atol=2e-3)


# ---------------------------------------------------------------------------------------------- host-device syncs
# Tensor methods that wait for an accelerator (they need a value on the host). On CPU they cost nothing, so a
# sampling loop that calls one would look fine here and stall a GPU at every step: we count the calls instead.
SYNCING_METHODS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
DICO_DIR = str(Path(__file__).resolve().parents[1] / "dico")


class HostSyncRecorder(TorchFunctionMode):
    """Record, for every syncing Tensor method (and boolean-mask indexing) called from code in the ``dico``
    package, the ``dico`` functions on the call stack. A torch-function mode sees these calls without patching
    ``torch.Tensor`` (patching its dunder methods would change the type's slots for the rest of the session)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" and len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        if name in SYNCING_METHODS:
            self.note(name)
        elif any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            self.note("boolean mask indexing")
        return func(*args, **(kwargs or {}))

    def note(self, what: str) -> None:
        frames = traceback.extract_stack()
        stack = [f"{Path(f.filename).name}:{f.name}" for f in frames if f.filename.startswith(DICO_DIR)]
        if stack:
            self.calls.append([what, *stack])


def test_host_sync_recorder_sees_the_syncing_calls():
    x = torch.randn(4)
    with HostSyncRecorder() as recorder:
        recorder.note = lambda what: recorder.calls.append([what])  # record calls from this test file too
        x[0].item(), bool(x[0] > 0), x.tolist(), x[x > 0]
    assert [c[0] for c in recorder.calls] == ["item", "__bool__", "tolist", "boolean mask indexing"]


@pytest.mark.parametrize(("sampler", "eta"), [("iddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_guided_sampling_makes_no_host_device_sync(sampler, eta):
    """250-step guided sampling must not wait for the device at each step: no .item(), no Python bool of a tensor,
    no tensor built from a Python list per step. (The backbone's input check converts a tensor to bool on CPU only,
    by design -- there is no device to wait for; on accelerators it asserts asynchronously: tested below.)"""
    torch.manual_seed(0)
    model = DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10, input_size=8).eval()
    labels = torch.tensor([1, 2])
    diffusion = sampling_diffusion(sampler, 10)
    kwargs = dict(sampler=sampler, steps=10, cfg_scale=2.0, eta=eta, diffusion=diffusion)
    generate(model, labels, (4, 8, 8), model.null_label, **kwargs)  # builds the cached device tables
    with HostSyncRecorder() as recorder:
        generate(model, labels, (4, 8, 8), model.null_label, **kwargs)
    calls = recorder.calls
    per_step = [c for c in calls if "base.py:check_inputs" not in c]
    assert per_step == [], f"host-device syncs in the sampling loop: {per_step[:3]}"
    assert len(calls) <= 10, "the CPU-only label check runs once per model call"


def test_input_check_does_not_sync_off_cpu():
    """On a non-CPU device (meta stands in for an accelerator) the label-range check is an asynchronous assert."""
    model = DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10, input_size=8)
    x, t, y = (
        torch.empty(2, 4, 8, 8, device="meta"),
        torch.zeros(2, dtype=torch.long, device="meta"),
        torch.zeros(2, dtype=torch.long, device="meta"),
    )
    with HostSyncRecorder() as recorder:
        model.check_inputs(x, t, y)
    assert recorder.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
def test_guided_sampling_does_not_synchronise_cuda():
    torch.manual_seed(0)
    model = DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10, input_size=8).cuda().eval()
    labels = torch.tensor([1, 2], device="cuda")
    diffusion = sampling_diffusion("iddpm", 10)
    generate(model, labels, (4, 8, 8), model.null_label, steps=10, cfg_scale=2.0, diffusion=diffusion)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = generate(model, labels, (4, 8, 8), model.null_label, steps=10, cfg_scale=2.0, diffusion=diffusion)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_sampling_options_are_filled_in_and_validated_in_one_place():
    """dico.diffusion.SamplingOptions: a module's sampling defaults are checked when it is built, and every sample
    call resolves its options there (steps beyond the process fail before any sampling)."""
    from dico.diffusion import SamplingOptions
    from dico.module import DiffusionModule
    from tests.conftest import TINY_MODEL

    with pytest.raises(ValueError, match="guidance_mode must be one of"):
        DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, guidance_mode="first3")
    with pytest.raises(ValueError, match="steps must be <= the model's 100 diffusion steps"):
        DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, diffusion_steps=100, sampling_steps=250)
    module = DiffusionModule("DiCo-S", model_kwargs=TINY_MODEL, diffusion_steps=100, sampling_steps=10, cfg_scale=2.0)
    assert SamplingOptions(sampler="ddim").resolved(module.hparams) == SamplingOptions("ddim", 10, 2.0, "official", 0.0)
    with pytest.raises(ValueError, match="steps must be <= the model's 100 diffusion steps"):
        module.sample([0, 1], steps=500)


def test_heldout_losses_depend_on_the_weights_alone():
    """Fixed timesteps (one per K-th slice of [0, T) for every sample) and fixed noise: the same weights give a
    bit-identical score whatever the global RNG state; other weights another score."""
    from dico.diffusion import create_diffusion
    from dico.diffusion.heldout import fixed_draws, heldout_losses
    from dico.models import create_model

    t, noise = fixed_draws(6, (1, 4, 4), 1000, 8, seed=0)
    assert t.shape == (48,) and noise.shape == (48, 1, 4, 4)
    assert torch.equal(t.view(6, 8) // 125, torch.arange(8).expand(6, 8))  # stratified
    assert len(set(t.view(6, 8)[:, 0].tolist())) == 6  # offsets differ between samples

    diffusion = create_diffusion("", "linear", diffusion_steps=1000, learn_sigma=True)
    kw = {"hidden_size": 8, "depth": [1, 1, 1, 1, 1], "in_channels": 1, "input_size": 16, "num_classes": 10}
    model, other = create_model("DiCo-S", **kw).eval(), create_model("DiCo-S", **kw).eval()
    for net, seed in ((model, 0), (other, 1)):  # trained-looking weights (the output layer starts at zero)
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, y = torch.rand(12, 1, 16, 16) * 2 - 1, torch.arange(12) % 10
    first = heldout_losses(diffusion, model, x, y, timesteps_per_sample=4, batch_size=16)
    torch.manual_seed(123)  # the global RNG is not used
    assert heldout_losses(diffusion, model, x, y, timesteps_per_sample=4, batch_size=16) == first
    assert set(first) == {"loss", "mse", "vb"} and first["loss"] == pytest.approx(first["mse"] + first["vb"])
    assert heldout_losses(diffusion, other, x, y, timesteps_per_sample=4, batch_size=16)["mse"] != first["mse"]
    assert heldout_losses(diffusion, model, x, y, timesteps_per_sample=4, seed=1)["mse"] != first["mse"]
    # batching changes the float rounding only
    assert heldout_losses(diffusion, model, x, y, timesteps_per_sample=4, batch_size=5)["mse"] == pytest.approx(
        first["mse"], rel=1e-5
    )
