"""Small shared layers. Feature maps inside blocks are channels-last, (B, H, W, C): pointwise convolutions
are then matrix products and LayerNorm needs no permutes. Weights keep the ``Conv2d`` layout of the published
checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (its weights and state dict are a ``Conv2d``'s) applied to channels-last maps
    (B, H, W, C): a matrix product, or a cuDNN convolution where only convolutions may use TF32."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv(x, self.weight, self.bias, as_convolution=tf32_for_convolutions_only(x))


def tf32_for_convolutions_only(x: Tensor) -> bool:
    """Whether ``x`` would get TF32 as a convolution but full fp32 as a matrix product: an fp32 CUDA tensor outside
    autocast under PyTorch's default flags (cuDNN TF32 on, matmul TF32 off), the setting the published DiCo trained
    and measured its throughput in. Elsewhere (CPU, strict fp32, all-TF32, bf16) the matrix product is as exact and
    faster."""
    return (
        x.is_cuda
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cuda")
        and torch.backends.cudnn.allow_tf32
        and not torch.backends.cuda.matmul.allow_tf32
    )


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None, as_convolution: bool) -> Tensor:
    """1x1 convolution of a channels-last map (B, H, W, C_in) with a Conv2d weight (C_out, C_in, 1, 1).

    ``as_convolution`` runs it as the published ``Conv2d`` does: on CUDA it then follows cuDNN's TF32 flag
    (``torch.backends.cudnn.allow_tf32``, on by default) like every other convolution, where a matrix product
    follows the matmul flag (off by default). As a matrix product under the default flags, DiCo-XL ran at half the
    published code's speed on an H200; as a matrix product in strict fp32 or bf16 it is 10-45% faster than as a
    convolution (benchmarks/RESULTS.md, GPU). On the CPU both are exact fp32 and the matrix product is the faster.
    """
    if as_convolution:  # the NCHW view of a contiguous channels-last map is channels_last: no copy either way
        return F.conv2d(x.permute(0, 3, 1, 2), weight, bias).permute(0, 2, 3, 1).contiguous()
    return F.linear(x, weight.flatten(1), bias)


class SpatialConv(nn.Conv2d):
    """A k x k convolution (stride 1, "same" padding) on channels-last maps (B, H, W, C) -> (B, H, W, C')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # A contiguous channels-last input is a channels_last NCHW view: oneDNN keeps that layout, so the final
        # .contiguous() is free; any other input is copied into channels-last once, here.
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


def channel_norm(dim: int) -> nn.LayerNorm:
    """The blocks' non-affine LayerNorm over channels (eps 1e-6)."""
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


# The two elementwise steps of every adaLN-Zero block, each as one fused multiply-add (``addcmul``): one pass over
# the feature map and one output tensor instead of two. This is the models' only fusion; ``dico.profiling`` counts
# an ``addcmul`` as the multiply and add it stands for, so the MAC counts are the published ones.
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift and scale broadcast over ``x`` (:class:`AdaLNModulation`)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: Tensor, gate: Tensor, branch: Tensor) -> Tensor:
    """adaLN-Zero's gated residual ``x + gate * branch``; the gate broadcasts over ``branch``."""
    return torch.addcmul(x, gate, branch)


class AdaLNModulation(nn.Sequential):
    """SiLU -> Linear(cond_dim, n * dim): the adaLN-Zero projection of the condition vector c (B, cond_dim).

    Returns ``n`` tensors of shape (B, 1, 1, dim) (shifts, scales, gates) that broadcast over a channels-last
    map (B, H, W, dim). Zero-initialised by the owning model so that every residual branch starts as the identity.
    """

    def __init__(self, cond_dim: int, dim: int, n: int) -> None:
        super().__init__(nn.SiLU(), nn.Linear(cond_dim, n * dim))
        self.n = n

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return super().forward(c)[:, None, None].chunk(self.n, dim=-1)


def activation(name: str) -> nn.Module:
    """Activation by name: ``gelu`` (exact), ``gelu_tanh``, ``relu``, ``silu``."""
    table = {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": lambda: nn.ReLU(),
        "silu": lambda: nn.SiLU(),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


def resolve_heads(dim: int, num_heads: int | None, head_dim: int) -> int:
    """Attention heads of a ``dim``-wide layer: ``num_heads`` if given, else ``dim // head_dim`` (at least one).

    Raises a ValueError when the width does not split evenly into that many heads.
    """
    heads = num_heads if num_heads is not None else max(1, dim // head_dim)
    if heads < 1 or dim % heads:
        raise ValueError(f"width {dim} does not split into {heads} attention heads; choose num_heads or head_dim")
    return heads


def zero_init_(module: nn.Module) -> None:
    """Set every parameter of ``module`` to zero (adaLN-Zero and output heads)."""
    for p in module.parameters():
        nn.init.zeros_(p)


def xavier_init_(module: nn.Module, as_matrix: bool = False) -> None:
    """Xavier-uniform weights and zero biases on every Linear/Conv2d below ``module``.

    ``as_matrix`` treats a conv kernel as a (out, in * k * k) matrix, as the published code does for
    the input stem ("initialise the patch embedding like a Linear").
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1) if as_matrix else w)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "AdaLNModulation",
    "PointwiseConv",
    "SpatialConv",
    "activation",
    "channel_norm",
    "gated_residual",
    "modulate",
    "pointwise_conv",
    "resolve_heads",
    "tf32_for_convolutions_only",
    "xavier_init_",
    "zero_init_",
]
