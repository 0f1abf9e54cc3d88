"""Small shared layers. Feature maps inside blocks are channels-last, (B, H, W, C): pointwise convolutions
are then matrix products and LayerNorm needs no permutes. Weights keep the ``Conv2d`` layout of the published
checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (its weights and state dict are a ``Conv2d``'s) applied to channels-last maps
    (B, H, W, C) as a matrix product."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


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


def broadcast(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample vector (B, C) shaped to broadcast over channels-last ``x`` (B, ..., C)."""
    return v.view(v.shape[0], *([1] * (x.ndim - 2)), v.shape[1])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` of channels-last ``x`` (B, ..., C); shift/scale (B, C)."""
    return x * (1 + broadcast(scale, x)) + broadcast(shift, x)


def counting_macs() -> bool:
    """True while ``torch.jit`` traces the model, as torchprofile does to count MACs.

    The fused ops below (``addcmul``) are then replaced by the reference multiply and add, because torchprofile
    counts every ``aten::mul`` by its output size and knows no ``addcmul``: the published MAC counts include them.
    """
    return torch.jit.is_tracing()


def may_overwrite(*observed: nn.Module) -> bool:
    """Whether the fused ops may write into intermediate tensors they are given: only without autograd (which
    would need them for the backward), outside torch.compile (which plans memory itself), not while counting,
    and only while no forward hook observes ``observed`` (the modules whose inputs or outputs would be
    overwritten; a hook that kept them, as feature-capturing analyses do, would see them change).

    Inference then allocates about half as many feature maps per block; on CPU every large allocation is a fresh
    ``mmap`` paid for with page faults, so this is a large part of eager CPU inference time.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or counting_macs():
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in observed) and not _global_hooks()


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def modulate_fused(x: Tensor, shift: Tensor, scale: Tensor, overwrite: bool = False) -> Tensor:
    """:func:`modulate` as one ``addcmul`` (one pass over ``x``, one output tensor instead of two); with
    ``overwrite`` the result is written into ``x`` (see :func:`may_overwrite`)."""
    if counting_macs():
        return modulate(x, shift, scale)
    out = x if overwrite and _holds_result(x, shift, scale) else None
    return torch.addcmul(broadcast(shift, x), x, broadcast(scale + 1, x), out=out)


def gated_residual(x: Tensor, gate: Tensor, branch: Tensor, overwrite: bool = False) -> Tensor:
    """``x + gate * branch`` (adaLN-Zero gate, (B, C)) as one ``addcmul`` on channels-last maps; with
    ``overwrite`` the result is written into ``branch`` (never into the residual stream ``x``)."""
    if counting_macs():
        return x + broadcast(gate, x) * branch
    out = branch if overwrite and branch.shape == x.shape and _holds_result(branch, x, gate) else None
    return torch.addcmul(x, broadcast(gate, x), branch, out=out)


def _holds_result(out: Tensor, *operands: Tensor) -> bool:
    """Whether ``out`` has the dtype of an elementwise result of itself and ``operands`` (e.g. not under autocast
    with a bf16 ``out`` and an fp32 operand): writing into it then rounds nothing more than a new tensor would."""
    return all(torch.promote_types(out.dtype, t.dtype) == out.dtype for t in operands)


def activate(act: nn.Module, x: Tensor, overwrite: bool = False) -> Tensor:
    """``act(x)``, in place when ``overwrite`` and the activation has an in-place form (GELU, ReLU, SiLU)."""
    if overwrite:
        if type(act) is nn.GELU:
            return torch.ops.aten.gelu_(x, approximate=act.approximate)
        if type(act) is nn.ReLU:
            return x.relu_()
        if type(act) is nn.SiLU:
            return F.silu(x, inplace=True)
    return act(x)


class AdaLNModulation(nn.Sequential):
    """SiLU -> Linear(dim, n * dim): the adaLN-Zero projection of the condition vector.

    Zero-initialised by the owning model so that every residual branch starts as the identity.
    """

    def __init__(self, cond_dim: int, dim: int, n: int) -> None:
        super().__init__(nn.SiLU(), nn.Linear(cond_dim, n * dim))
        self.n = n

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return super().forward(c).chunk(self.n, dim=1)


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
    "broadcast",
    "channel_norm",
    "counting_macs",
    "gated_residual",
    "modulate",
    "modulate_fused",
    "resolve_heads",
    "xavier_init_",
    "zero_init_",
]
