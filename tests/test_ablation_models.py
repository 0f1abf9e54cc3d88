"""Ablation variants (Tables 3 and 4): counts against the paper, training and sampling at tiny size, and the
new parts checked against their definitions (SE, MDTA, self/window/focused-linear/agent attention)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from dico.diffusion import create_diffusion
from dico.models import TOKEN_MIXERS, DiCo, create_model, list_models
from dico.models.ablation import ABLATION_ROWS, TABLE3, TABLE4, VARIANTS
from dico.models.attention import (
    AgentAttention2d,
    FocusedLinearAttention2d,
    SelfAttention2d,
    WindowAttention2d,
    focus,
)
from dico.models.channel_attention import ChannelSelfAttention, SqueezeExcitation
from dico.models.mixers import build_mixer
from dico.profiling import count_macs, count_parameters
from dico.shape_search import SEARCHES
from tests.numerics import assert_close

ROWS = sorted(ABLATION_ROWS)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are small: one intra-op thread is faster, and far faster on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def paper_rows(paper: dict, table: str) -> dict[str, dict]:
    rows = paper[table] if table == TABLE3 else paper[table]["rows"]
    return {r["row"]: r for r in rows}


@functools.cache
def full_size_counts(name: str) -> tuple[int, int]:
    """(params, MACs at 1x4x32x32) of a full-size variant built on the meta device, allocated uninitialised."""
    with torch.device("meta"):
        model = create_model(name)
    model = model.to_empty(device="cpu")
    return count_parameters(model), count_macs(model, 32)


def test_every_paper_row_is_a_registered_variant(paper):
    expected = {(table, row) for table in (TABLE3, TABLE4) for row in paper_rows(paper, table)}
    assert set(ABLATION_ROWS) == expected
    assert {row.model for row in ABLATION_ROWS.values()} == set(VARIANTS) <= set(list_models())
    # CM->Self-Attn and DiT (U-shape) have identical numbers in the paper: one model under two names
    assert VARIANTS["DiT-U"].kwargs == VARIANTS["DiCo-S-SelfAttn"].kwargs
    # the packaged copy of the tables (what the runner reads) is the reference one
    assert all(row.paper == paper_rows(paper, row.table)[row.row] for row in ABLATION_ROWS.values())
    # every adjusted shape is ours, says so, and has its search (DiCo-S-SelfAttn is DiT-U under its other name)
    adjusted = {name for name, v in VARIANTS.items() if v.adjusted}
    assert set(SEARCHES) == adjusted - {"DiCo-S-SelfAttn"}
    assert all(VARIANTS[name].shape.startswith(("ours", "= DiT-U")) for name in adjusted)
    assert all(v.shape != "published" or not v.deviation for v in VARIANTS.values())


# The width-128 searches take a second or two each; DiT-U's (a width grid) and the isotropic ones (an FFN-ratio
# grid) take minutes: ``python -m dico.shape_search`` reprints them all.
@pytest.mark.parametrize("name", [n for n in SEARCHES if n not in ("DiT-U", "DiCo-iso", "DiCo-iso-skip")])
def test_adjusted_shapes_are_the_search_results(name):
    best = SEARCHES[name]().best
    kwargs = VARIANTS[name].kwargs
    assert (best.hidden_size, best.depth, best.mlp_ratio) == (kwargs["hidden_size"], tuple(kwargs["depth"]), 2.0)
    assert (best.params, best.macs) == (VARIANTS[name].params, VARIANTS[name].macs)  # the block-sum is exact


@pytest.mark.parametrize("key", ROWS, ids=[f"{t[:6]}:{r}" for t, r in ROWS])
def test_row_counts_match_the_paper(key, paper):
    row = ABLATION_ROWS[key]
    ref = paper_rows(paper, row.table)[row.row]
    params, macs = full_size_counts(row.model)
    assert (params, macs) == (row.variant.params, row.variant.macs), "recorded counts are stale"
    # every variant is within 1% of the paper's counts (a knob outside depths/width may move: Variant.deviation)
    assert params / 1e6 == pytest.approx(ref["params_M"], rel=0.01)
    assert macs / 1e9 == pytest.approx(ref["gflops"], rel=0.01)


def test_skip_variants_add_exactly_five_linear_skips():
    width = 384
    skips = 5 * (2 * width * width + width)
    assert VARIANTS["DiT-S/2-skip"].params - VARIANTS["DiT-S/2"].params == skips
    assert VARIANTS["DiCo-iso-skip"].params - VARIANTS["DiCo-iso"].params == skips
    skip_macs = 5 * 16 * 16 * 2 * width * width  # on 16x16 tokens
    assert VARIANTS["DiT-S/2-skip"].macs - VARIANTS["DiT-S/2"].macs == skip_macs
    assert VARIANTS["DiCo-iso-skip"].macs - VARIANTS["DiCo-iso"].macs == skip_macs


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_size_forward_shape(name):
    with torch.device("meta"):
        model = create_model(name)
        out = model(torch.empty(2, 4, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 32, 32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tiny_variant_trains_and_samples(name):
    """adaLN-Zero: the first backward reaches only the zero head; two optimizer steps later every parameter gets
    gradient. Then a 4-step iDDPM sample is finite."""
    torch.manual_seed(0)
    model = create_model(name, **VARIANTS[name].tiny_overrides())
    size = model.input_size
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, t = torch.randn(4, 4, size, size), torch.randint(0, 1000, (4,))
    y = torch.tensor([1, 2, 10, 10])  # 10 = the null label
    target = torch.randn(4, 8, size, size)
    dead_per_pass = []
    for _ in range(3):
        opt.zero_grad()
        out = model(x, t, y)
        assert out.shape == (4, 8, size, size) and torch.isfinite(out).all()
        (out - target).square().mean().backward()
        dead_per_pass.append(
            {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
        )
        opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    first = trainable - dead_per_pass[0]  # the output projection's weight and bias
    assert len(first) == 2 and all(n.startswith("head.") for n in first)
    assert dead_per_pass[2] == set()

    samples = create_diffusion("4").p_sample_loop(
        model.eval(),
        (2, 4, size, size),
        model_kwargs={"y": torch.tensor([3, 4])},
        clip_denoised=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert samples.shape == (2, 4, size, size) and torch.isfinite(samples).all()


# ---------------------------------------------------------------------------------------------------------------
# channel attentions


def test_se_squeezes_by_16_and_only_rescales_channels():
    torch.manual_seed(0)
    se = SqueezeExcitation(64)
    assert (se.reduce.out_channels, se.expand.in_channels, se.expand.out_channels) == (4, 4, 64)
    x = torch.randn(2, 5, 5, 64)
    out = se(x)
    gate = out / x
    assert ((gate > 0) & (gate < 1)).all()  # a sigmoid gate per sample and channel, the same at every position
    torch.testing.assert_close(gate, gate[:, :1, :1].expand_as(gate))
    with torch.no_grad():
        gap = x.mean((1, 2))
        manual = torch.sigmoid(
            F.linear(
                F.relu(F.linear(gap, se.reduce.weight.flatten(1), se.reduce.bias)),
                se.expand.weight.flatten(1),
                se.expand.bias,
            )
        )
    torch.testing.assert_close(gate[:, 0, 0], manual)


def test_mdta_is_positively_homogeneous_and_permutation_equivariant_without_its_dwconv():
    torch.manual_seed(0)
    mdta = ChannelSelfAttention(32, num_heads=2)
    assert mdta.temperature.shape == (2, 1, 1)
    x = torch.randn(2, 6, 6, 32)
    # no biases: q, k are L2-normalised over space (scale-free), v and the projections are linear: f(a x) = a f(x)
    assert_close(mdta(3.0 * x), 3.0 * mdta(x), layers=6)
    # with the 3x3 depthwise conv made the identity, the d x d maps pool over all positions:
    # permuting positions permutes the output the same way
    with torch.no_grad():
        mdta.qkv_dw.weight.zero_()
        mdta.qkv_dw.weight[:, :, 1, 1] = 1
    perm = torch.randperm(36)
    shuffle = lambda t: t.reshape(2, 36, 32)[:, perm].reshape(2, 6, 6, 32)
    assert_close(mdta(shuffle(x)), shuffle(mdta(x)), layers=6)


def test_mdta_heads_mix_channels_only_within_a_head():
    """Channel attention per head: with an identity output projection, output channels of head 0 read only head
    0's v; changing head 1's v (rows 2C + 16 .. 3C of the qkv projection) leaves them untouched."""
    torch.manual_seed(0)
    mdta = ChannelSelfAttention(32, num_heads=2)
    x = torch.randn(2, 6, 6, 32)
    with torch.no_grad():
        mdta.proj.weight.copy_(torch.eye(32)[:, :, None, None])
        base = mdta(x)
        mdta.qkv.weight[80:96] += torch.randn(16, 32, 1, 1)
        moved = mdta(x)
    torch.testing.assert_close(moved[..., :16], base[..., :16], rtol=0, atol=1e-6)
    assert not torch.allclose(moved[..., 16:], base[..., 16:])


# ---------------------------------------------------------------------------------------------------------------
# token mixers


def test_self_attention_is_global_and_permutation_equivariant():
    torch.manual_seed(0)
    attn = SelfAttention2d(32, head_dim=16)
    x = torch.randn(2, 4, 4, 32)
    perm = torch.randperm(16)
    shuffle = lambda t: t.reshape(2, 16, 32)[:, perm].reshape(2, 4, 4, 32)
    assert_close(attn(shuffle(x)), shuffle(attn(x)), layers=4)
    bumped = x.clone()
    bumped[:, 0, 0] += 1
    assert ((attn(bumped) - attn(x)).abs().amax((0, 3)) > 0).all()  # every token sees the change


def _changed(module, x, at):
    bumped = x.clone()
    bumped[:, at[0], at[1]] += 1.0
    with torch.no_grad():
        return (module(bumped) - module(x)).abs().amax((0, 3)) > 1e-6  # (H, W) map of tokens that moved


def _box(h, w, rows, cols):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[rows, cols] = True
    return m


def test_window_attention_mixes_across_window_borders_only_when_shifted():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 32)
    plain = WindowAttention2d(32, block_index=0, window_size=4)
    shifted = WindowAttention2d(32, block_index=1, window_size=4)
    assert (plain.shift_size, shifted.shift_size) == (0, 2)
    # unshifted: a token only reaches its own 4x4 window
    assert torch.equal(_changed(plain, x, (3, 3)), _box(8, 8, slice(0, 4), slice(0, 4)))
    # shifted by 2: the window around (3, 3) is rows/cols 2..5, across the unshifted borders
    assert torch.equal(_changed(shifted, x, (3, 3)), _box(8, 8, slice(2, 6), slice(2, 6)))
    # the cyclic roll puts (0, 0) in a window with rows/cols 6, 7; the mask keeps them apart
    assert torch.equal(_changed(shifted, x, (0, 0)), _box(8, 8, slice(0, 2), slice(0, 2)))


@pytest.mark.parametrize("block_index", [0, 1])
def test_window_attention_equals_masked_global_attention(block_index):
    """Swin, restated on the full map: token i attends to j iff they share a (shifted) window and a region of
    the roll, with the bias table entry of their (dy, dx); computed here directly, without windows or rolls."""
    torch.manual_seed(0)
    h = w = 8
    ws, heads, c = 4, 2, 16
    attn = WindowAttention2d(c, block_index=block_index, window_size=ws, num_heads=heads)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, h, w, c)
    s = attn.shift_size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    sy, sx = (ys - s) % h, (xs - s) % w  # coordinates after the roll by -s

    def region(v, n):  # Swin's bands of the rolled map: [0, n-ws), [n-ws, n-s), [n-s, n)
        return (v >= n - ws).long() + ((v >= n - s) & (s > 0)).long()

    same = ((sy[:, None] // ws) == (sy[None] // ws)) & ((sx[:, None] // ws) == (sx[None] // ws))
    same &= (region(sy, h)[:, None] == region(sy, h)[None]) & (region(sx, w)[:, None] == region(sx, w)[None])
    # (dy, dx) of allowed pairs lie within a window; clamp the others (masked anyway) into the table
    dy, dx = ((a[:, None] - a[None]).clamp(1 - ws, ws - 1) for a in (ys, xs))
    bias = attn.relative_position_bias_table[(dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)].permute(2, 0, 1)
    q, k, v = (t.reshape(2, h * w, heads, c // heads).transpose(1, 2) for t in attn.qkv(x).chunk(3, -1))
    scores = q @ k.transpose(-2, -1) / math.sqrt(c // heads) + bias
    out = scores.masked_fill(~same, float("-inf")).softmax(-1) @ v
    expected = attn.proj(out.transpose(1, 2).reshape(2, h, w, c))
    assert_close(attn(x), expected, layers=4)


def test_window_attention_on_small_maps_and_bad_sizes():
    torch.manual_seed(0)
    attn = WindowAttention2d(16, block_index=1, window_size=8)
    x = torch.randn(1, 4, 4, 16)
    assert attn.windowing(4, 4) == (4, 0)  # a map no larger than a window: one window, no shift (Swin)
    assert _changed(attn, x, (0, 0)).all()
    with pytest.raises(ValueError, match="must divide the stage resolution 12x12"):
        attn(torch.randn(1, 12, 12, 16))
    with pytest.raises(ValueError, match="must divide"):
        WindowAttention2d(16, window_size=8, resolution=(12, 12))
    with pytest.raises(ValueError, match="must divide"):
        DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), input_size=24, mixer="window_attention")  # stage 12x12


def test_focused_linear_attention_equals_its_quadratic_form():
    torch.manual_seed(0)
    c, heads = 32, 2
    attn = FocusedLinearAttention2d(c, resolution=(6, 6), num_heads=heads).double()  # x**3 features: float64
    with torch.no_grad():
        attn.dwc.weight.zero_()
        attn.dwc.bias.zero_()
        attn.scale.normal_()
        attn.positional_encoding.normal_()
    x = torch.randn(2, 6, 6, c, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, -1)
    fq, fk = attn.feature_map(q), attn.feature_map(k + attn.positional_encoding)
    split = lambda t: t.reshape(2, 36, heads, c // heads).transpose(1, 2)
    sim = split(fq) @ split(fk).transpose(-2, -1)  # (B, heads, N, N), non-negative
    out = (sim @ split(v)) / (sim.sum(-1, keepdim=True) + 36 * 1e-6)  # FLatten's normaliser: q . mean(k) + 1e-6
    expected = attn.proj(out.transpose(1, 2).reshape(2, 6, 6, c))
    torch.testing.assert_close(attn(x), expected, rtol=1e-7, atol=1e-9)
    # the focusing function keeps the norm and sharpens the direction (power 3)
    t = torch.rand(5, 8)
    torch.testing.assert_close(focus(t, 3).norm(dim=-1), t.norm(dim=-1))
    assert (focus(t, 3).amax(-1) / t.amax(-1) >= 1 - 1e-6).all()


def test_agent_attention_broadcasts_its_agents():
    """One agent (the mean query): every token receives the same aggregated value (plus its v's conv)."""
    torch.manual_seed(0)
    c, heads = 16, 2
    attn = AgentAttention2d(c, resolution=(4, 4), agent_num=1, num_heads=heads)
    with torch.no_grad():
        attn.dwc.weight.zero_()
        attn.dwc.bias.zero_()
    x = torch.randn(2, 4, 4, c)
    out = attn(x)
    torch.testing.assert_close(out, out[:, :1, :1].expand_as(out))
    q, k, v = attn.qkv(x).chunk(3, -1)
    agent = q.mean((1, 2)).reshape(2, heads, 1, c // heads)
    split = lambda t: t.reshape(2, 16, heads, c // heads).transpose(1, 2)
    bias = attn.biases(4, 4)[0]  # (heads, 1, N)
    agg = ((agent @ split(k).transpose(-2, -1)) / math.sqrt(c // heads) + bias).softmax(-1) @ split(v)
    assert_close(out[:, 0, 0], attn.proj(agg.reshape(2, c)), layers=4)
    with pytest.raises(ValueError, match="perfect square"):
        AgentAttention2d(c, resolution=(4, 4), agent_num=8)


@pytest.mark.parametrize("mixer", ["focused_linear_attention", "agent_attention"])
def test_resolution_sized_mixers_need_and_adapt_their_resolution(mixer):
    with pytest.raises(ValueError, match="resolution"):
        build_mixer(mixer, 16)
    kw = {"agent_num": 4} if mixer == "agent_attention" else {}
    model = DiCo(hidden_size=16, depth=(1, 1, 1, 1, 1), input_size=16, num_classes=10, mixer=mixer, mixer_kwargs=kw)
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # built for 16x16, run at 8x8: the resolution-sized parameters are interpolated
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()


def test_mixers_and_channel_attentions_are_registered():
    from dico.models import CHANNEL_ATTENTION

    assert {"conv", "self_attention", "window_attention", "focused_linear_attention", "agent_attention"} <= set(
        TOKEN_MIXERS.names()
    )
    assert {"cca", "none", "se", "channel_self_attention"} <= set(CHANNEL_ATTENTION.names())


def test_window_attention_model_on_a_tiny_input():
    """Stages at 8, 4 and 2 with 4x4 windows: shifted windows at 8x8, one (clamped, unshifted) window below."""
    torch.manual_seed(0)
    model = DiCo(
        hidden_size=16,
        depth=(2, 1, 1, 1, 2),
        input_size=8,
        num_classes=10,
        mixer="window_attention",
        mixer_kwargs={"window_size": 4},
    )
    assert [b.mixer.shift_size for b in model.encoder1] == [0, 2]
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
