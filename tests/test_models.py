"""Backbones: published parameter counts and MACs, golden outputs, loading, gradients, input checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dico.checkpoints import load_official
from dico.models import DiCo, DiT, create_model, list_models
from dico.models.layers import PointwiseConv, pointwise_conv, tf32_for_convolutions_only
from dico.models.official import convert_official_state_dict
from dico.profiling import count_macs, count_parameters, profile_macs
from tests.numerics import assert_close

PUBLISHED = ["DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]


def uninitialised(name: str, **overrides) -> torch.nn.Module:
    """Build on the meta device and allocate without initialising: counts and MACs need no values."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return model.to_empty(device="cpu")


def small_dico(**kw) -> DiCo:
    return DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=10, input_size=8, **kw)


def test_registry_has_every_published_model():
    assert set(PUBLISHED) <= set(list_models())


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_and_macs_match_published(name, paper):
    model = uninitialised(name)
    assert count_parameters(model) == paper["exact_param_counts_of_published_models"][name]
    gmacs = count_macs(model, 32) / 1e9
    assert gmacs == pytest.approx(paper["exact_gmacs_of_published_models_32x32x4"][name], rel=1e-3)


def test_macs_at_512(paper):
    dit = uninitialised("DiT-XL/2", input_size=64)
    assert count_macs(dit, 64) / 1e9 == pytest.approx(524.70, rel=1e-3)  # Table 2
    # DiT's fixed positions are a (frozen) parameter, as published: 1024 tokens at 512 instead of 256.
    assert count_parameters(dit) == paper["exact_param_counts_of_published_models"]["DiT-XL/2"] + 768 * 1152

    dico = uninitialised("DiCo-XL", input_size=64)
    assert count_parameters(dico) == paper["exact_param_counts_of_published_models"]["DiCo-XL"]
    # The published DiCo code itself counts 348,191,378,016 MACs at 64x64 (measured with torchprofile 0.1.0);
    # Table 2 prints 349.78, which no resolution change of the published architecture reaches (0.45% above).
    macs = count_macs(dico, 64)
    assert macs == 348_191_378_016
    assert macs / 1e9 == pytest.approx(349.78, rel=5e-3)


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("latent", [32, 64])
def test_output_shapes_at_256_and_512(name, latent):
    with torch.device("meta"):
        model = create_model(name, input_size=latent)
        x = torch.empty(2, 4, latent, latent)
        out = model(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, latent, latent)


@pytest.mark.parametrize("pointwise", ["matmul", "convolution"])
def test_dico_matches_published_outputs(golden, pointwise, monkeypatch):
    # "convolution" is the path CUDA takes (cuDNN, like the published Conv2d), run here on the CPU
    if pointwise == "convolution":
        monkeypatch.setattr(
            PointwiseConv, "forward", lambda self, x: pointwise_conv(x, self.weight, self.bias, as_convolution=True)
        )
    g = golden["dico"]
    model = load_official(g["state_dict"], "dico").eval()
    assert model.depth == g["config"]["depth"] and model.hidden_size == g["config"]["hidden_size"]
    with torch.no_grad():
        out = model(g["x"], g["t"], g["y"])
    torch.testing.assert_close(out, g["out"], rtol=1e-5, atol=1e-5)


def test_pointwise_conv_paths_agree_and_the_cpu_takes_the_matrix_product():
    calls = []
    layer = PointwiseConv(8, 4)
    original = torch.nn.functional.conv2d
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or original(*a, **k))
        out = layer(torch.randn(2, 3, 3, 8))
    assert out.shape == (2, 3, 3, 4) and not calls  # the CPU path is the matrix product
    x = torch.randn(2, 5, 5, 8)
    via_conv = pointwise_conv(x, layer.weight, layer.bias, as_convolution=True)
    assert via_conv.is_contiguous() and via_conv.shape == (2, 5, 5, 4)
    assert_close(via_conv, layer(x), layers=1)


def test_pointwise_conv_is_a_convolution_exactly_where_only_convolutions_get_tf32():
    cuda_fp32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)  # stands in for a CUDA tensor
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # PyTorch's defaults
        assert tf32_for_convolutions_only(cuda_fp32)  # the published code's setting
        assert not tf32_for_convolutions_only(torch.zeros(1))  # CPU
        assert not tf32_for_convolutions_only(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16))
        torch.backends.cuda.matmul.allow_tf32 = True
        assert not tf32_for_convolutions_only(cuda_fp32)  # all TF32: the matrix product gets it too
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
        assert not tf32_for_convolutions_only(cuda_fp32)  # strict fp32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_dit_matches_published_outputs(golden):
    g = golden["dit"]
    model = load_official(g["state_dict"], "dit", num_heads=g["config"]["num_heads"]).eval()
    with torch.no_grad():
        out = model(g["x"], g["t"], g["y"])
    torch.testing.assert_close(out, g["out"], rtol=1e-5, atol=1e-5)
    # our fixed positions are the published ones
    torch.testing.assert_close(DiT(**g["config"]).pos_embed, g["state_dict"]["pos_embed"])


def test_round_trip_and_training_checkpoint_format(golden):
    g = golden["dico"]
    ema = {k: v + 1.0 for k, v in g["state_dict"].items()}
    ckpt = {"model": g["state_dict"], "ema": ema, "opt": {}, "args": None}
    from_ema = load_official(ckpt, "dico")
    from_model = load_official(ckpt, "dico", use_ema=False)
    ours_ema = convert_official_state_dict(ema, "dico")
    assert all(torch.equal(v, ours_ema[k]) for k, v in from_ema.state_dict().items())
    assert torch.equal(from_model.stem.weight, g["state_dict"]["x_embedder.proj.weight"])


def test_load_official_names_missing_and_unexpected_keys(golden):
    sd = dict(golden["dico"]["state_dict"])
    sd.pop("latent.0.conv2.weight")
    sd["latent.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as err:
        load_official(sd, "dico")
    assert "middle.0.mixer.dw.weight" in str(err.value)
    assert "latent.0.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="num_heads"):
        load_official(golden["dit"]["state_dict"], "dit")  # width 64 is no published DiT: heads unknown


def test_load_official_from_path(tmp_path, golden):
    path = tmp_path / "dico.pt"
    torch.save(golden["dico"]["state_dict"], path)
    model = load_official(str(path), "dico").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(*(golden["dico"][k] for k in "xty")), golden["dico"]["out"], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    ("build", "head"),
    [
        (small_dico, "head.proj."),
        (lambda: DiT(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10), "head.proj."),
    ],
)
def test_gradients_reach_every_parameter_once_trained(build, head):
    """adaLN-Zero: the first backward reaches only the zero-initialised head; after two optimizer steps
    every parameter (label tables' null row included) receives gradient: no dead ends."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, t = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    y = torch.tensor([1, 2, 10, 10])  # 10 = the null label of classifier-free guidance
    target = torch.randn(4, 8, 8, 8)
    dead_per_pass = []
    for _ in range(3):
        opt.zero_grad()
        (model(x, t, y) - target).square().mean().backward()
        dead_per_pass.append(
            {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
        )
        opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - dead_per_pass[0] == {head + "weight", head + "bias"}
    assert dead_per_pass[2] == set()


def test_initialisation_is_adaln_zero_and_seeded():
    torch.manual_seed(1)
    a = small_dico()
    torch.manual_seed(1)
    b = small_dico()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    assert a.eval()(x, t, y).abs().max() == 0  # zero head: the untrained model predicts zeros
    assert all(blk.modulation[1].weight.abs().sum() == 0 for blk in a.blocks())


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    model = small_dico(class_dropout_prob=0.5)
    for p in model.head.parameters():
        torch.nn.init.normal_(p)
    x, t = torch.randn(64, 4, 8, 8), torch.full((64,), 10)
    y = torch.zeros(64, dtype=torch.long)
    model.eval()
    ref = model(x, t, y)
    assert torch.equal(model(x, t, y), ref)  # deterministic in eval
    null = model(x, t, torch.full_like(y, 10))
    model.train()
    out = model(x, t, y)
    dropped = torch.isclose(out, null, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, ref, atol=1e-6).flatten(1).all(1)
    assert (dropped | kept).all() and 10 < dropped.sum() < 54


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), r"shape \(B, 4, H, W\)"),
        (torch.randn(2, 4, 8), torch.tensor([0, 1]), r"shape \(B, 4, H, W\)"),
        (torch.randn(2, 4, 6, 6), torch.tensor([0, 1]), "divisible by 4"),
        (torch.randn(2, 4, 8, 8), torch.tensor([0, 11]), r"\[0, 10\]"),
        (torch.randn(2, 4, 8, 8), torch.tensor([-1, 0]), "num_classes=10"),
        (torch.randn(2, 4, 8, 8), torch.tensor([0.0, 1.0]), "integers"),
        (torch.randn(2, 4, 8, 8), torch.tensor([0]), r"shape \(2,\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        small_dico()(x, torch.zeros(x.shape[0], dtype=torch.long), y)


def test_unknown_part_names_list_the_choices():
    with pytest.raises(KeyError, match=r"known: .*conv"):
        small_dico(mixer="nope")
    with pytest.raises(KeyError, match=r"known: .*cca"):
        small_dico(mixer_kwargs={"channel_attention": "nope"})
    with pytest.raises(KeyError, match="DiCo-S"):
        create_model("DiCo-XXL")
    for name in ("DiCo-S", "DiT-S/2"):  # a misspelt model_kwargs key: named, with the keys the model takes
        with pytest.raises(ValueError, match=rf"{name} takes no argument \['hiden_size'\] .*hidden_size, in_channels"):
            create_model(name, hiden_size=8)


@pytest.mark.parametrize(
    ("name", "shape"), [("DiCo-S", {"depth": [1, 1, 1, 1, 1]}), ("DiT-S/2", {"depth": 2, "num_heads": 2})]
)
def test_models_trace_as_one_graph_for_torch_compile(name, shape):
    """torch.compile(fullgraph=True) raises on any graph break (a host sync, a Python branch on a tensor value):
    training and inference forwards must trace whole and compute what eager mode does. The "eager" backend
    checks the tracing without paying for code generation."""
    torch.manual_seed(0)
    model = create_model(name, hidden_size=16, in_channels=1, input_size=8, num_classes=10, **shape)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 5, 9])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(x, t, y)
    out.square().mean().backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), out.detach(), rtol=0, atol=0)
        assert_close(model(x, t, y), out.detach(), layers=20)  # ~20 layers deep; traced op order may differ
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mac_counter_counts_a_fused_multiply_add_as_its_multiply():
    """The blocks fuse ``a + b * c`` into ``addcmul``, which torchprofile does not know: counted as the unfused ops
    (one multiply per output element, the add free), the published counts hold (the tests above)."""

    class Unfused(torch.nn.Module):
        def forward(self, a, b, c):
            return a + b * c

    class Fused(torch.nn.Module):
        def forward(self, a, b, c):
            return torch.addcmul(a, b, c)

    a, b, c = torch.randn(2, 5, 5, 8), torch.randn(2, 1, 1, 8), torch.randn(2, 5, 5, 8)
    assert profile_macs(Fused(), (a, b, c)) == profile_macs(Unfused(), (a, b, c)) == 2 * 5 * 5 * 8
